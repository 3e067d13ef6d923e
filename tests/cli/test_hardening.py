"""Bad input across every command: exit 2, one stderr line, no traceback, no file changed.

Each case builds its damage in a fresh copy of a small "world" (a tiny dense model as a directory
and as GGUF, a tiny routed directory, text files), runs the CLI in-process, and compares a hash of
every file in the world before and after: a failing command may not create, change or delete
anything, not even its requested output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from adaroute.cli import main
from adaroute.config import RoutingConfig
from adaroute.routing import save_routed
from tests.fixtures import make_tiny_tokenizer, write_gguf, write_hf_dir
from tests.routing.conftest import calibrated_copy

TEXT = "Lists are mutable sequences. Tuples are immutable sequences. " * 40


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_hf_dir(root / "dense", seed=0)
    write_gguf(root / "tiny.gguf", seed=1)
    model, _ = calibrated_copy(seed=3)
    save_routed(model, make_tiny_tokenizer(), root / "routed", "tiny", RoutingConfig(), {"data": ["x"]})
    (root / "text.txt").write_text(TEXT)
    (root / "short.txt").write_text("Hi there.")
    (root / "out").mkdir()
    return root


@pytest.fixture
def world(template, tmp_path) -> Path:
    root = tmp_path / "w"
    shutil.copytree(template, root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            out[rel] = "dir" if p.is_dir() else ("fifo" if not p.is_file() else
                                                  hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ---- damage, applied to the world copy before the command runs ----

def edit_meta(change):
    def apply(w: Path):
        cfg = json.loads((w / "routed/config.json").read_text())
        change(cfg["adaroute"])
        (w / "routed/config.json").write_text(json.dumps(cfg))
    return apply


def write(rel: str, data: bytes):
    def apply(w: Path):
        (w / rel).write_bytes(data)
    return apply


def truncate(rel: str, keep: float):
    def apply(w: Path):
        raw = (w / rel).read_bytes()
        (w / rel).write_bytes(raw[: int(len(raw) * keep)])
    return apply


def remove(*rels: str):
    def apply(w: Path):
        for rel in rels:
            (w / rel).unlink()
    return apply


def fifo(w: Path):
    os.mkfifo(w / "pipe.txt")


def nul_late(w: Path):
    (w / "late.txt").write_bytes(b"word " * 20000 + b"\x00 tail")


def set_json(rel: str, value):
    return write(rel, json.dumps(value).encode())


def routed_cfg(**kw):
    return edit_meta(lambda m: m.update(kw))


def del_key(key: str):
    return edit_meta(lambda m: m.pop(key))


def layer0(**kw):
    return edit_meta(lambda m: m["layers"][0].update(kw))


def unsupported(w: Path):
    cfg = json.loads((w / "dense/config.json").read_text())
    cfg["model_type"] = "gpt2"
    (w / "dense/config.json").write_text(json.dumps(cfg))


def non_routed_files(w: Path):
    (w / "out/mine.txt").write_text("precious")


E = ["eval", "{routed}", "--data", "{text}"]
D = ["eval", "{dense}", "--data", "{text}"]
CASES = [
    # models: paths and damaged dense files
    (["eval", "no/such/model", "--data", "{text}"], None, "no such model"),
    (["eval", "", "--data", "{text}"], None, "not a model path"),
    (["eval", "a\x00b", "--data", "{text}"], None, "not a model path"),
    (["eval", "{w}/tiny.gguf", "--data", "{text}"], write("tiny.gguf", b""), "not a GGUF file"),
    (["eval", "{w}/tiny.gguf", "--data", "{text}"], write("tiny.gguf", b"\x13" * 300), "not a GGUF file"),
    (["eval", "{w}/tiny.gguf", "--data", "{text}"], truncate("tiny.gguf", 0.6), "is truncated"),
    (["eval", "{w}/tiny.gguf", "--data", "{text}"], truncate("tiny.gguf", 0.001), "truncated"),
    (["eval", "{w}/text.txt", "--data", "{text}"], None, "not a .gguf model"),
    (D, write("dense/config.json", b"{not json"), "cannot read"),
    (D, set_json("dense/config.json", [1, 2]), "not an object"),
    (D, remove("dense/tokenizer.json", "dense/tokenizer_config.json"), "no tokenizer files"),
    (D, unsupported, "unsupported architecture 'gpt2'"),
    (D, write("dense/model.safetensors", b""), "cannot load the model"),
    # routed directories: config.json
    (E, set_json("routed/config.json", {"adaroute": []}), "not an object"),
    (E, set_json("routed/config.json", "text"), "not an object"),
    (E, write("routed/config.json", b"\xff\xfe garbage"), "config.json"),
    (E, del_key("layers"), "key layers is missing"),
    (E, del_key("base_config"), "key base_config is missing"),
    (E, del_key("router"), "key router is missing"),
    (E, routed_cfg(format_version=99), "routed format 99"),
    (E, routed_cfg(format_version="1"), "routed format '1'"),
    (E, routed_cfg(layers=[]), "layers is empty"),
    (E, routed_cfg(layers="all"), "layers is a str"),
    (E, routed_cfg(router={"group_size": "x"}), "router.group_size is a str"),
    (E, routed_cfg(router={"group_size": 0}), "group_size must be positive"),
    (E, routed_cfg(routing={"density": 5}), "routing: density"),
    (E, routed_cfg(routing={"colour": 1}), "unknown keys"),
    (E, routed_cfg(base_model=7), "base_model is a int"),
    (E, edit_meta(lambda m: m["base_config"].pop("model_type")), "base_config.model_type is missing"),
    (E, edit_meta(lambda m: m["base_config"].update(model_type="gpt2")), "unsupported architecture 'gpt2'"),
    (E, edit_meta(lambda m: m["base_config"].update(hidden_size=-3)), "base_config does not describe a model"),
    (E, layer0(threshold="abc"), "not a number"),
    (E, layer0(threshold=None), "threshold is a NoneType"),
    (E, layer0(layer=99), "out of range"),
    (E, layer0(min_units=50, max_units=10), "min_units"),
    (E, layer0(profile=[1]), "profile is not an object"),
    (E, edit_meta(lambda m: m["layers"].__setitem__(0, 3)), "layers[0] is not an object"),
    # routed directories: weights and tokenizer
    (E, remove("routed/model.safetensors"), "model.safetensors: missing"),
    (E, write("routed/model.safetensors", b""), "not a safetensors file"),
    (E, write("routed/model.safetensors", b"garbage" * 100), "not a safetensors file"),
    (E, truncate("routed/model.safetensors", 0.5), "is truncated"),
    (E, truncate("routed/model.safetensors", 0.0001), "safetensors"),
    (E, remove("routed/tokenizer.json"), "no tokenizer files"),
    # data files
    (["eval", "{dense}", "--data", "{w}/missing.txt"], None, "no such file"),
    (["eval", "{dense}", "--data", "{w}/out"], None, "is a directory"),
    (["eval", "{dense}", "--data", "{w}/pipe.txt"], fifo, "not a regular file"),
    (["eval", "{dense}", "--data", "{w}/e.txt"], write("e.txt", b""), "is empty"),
    (["eval", "{dense}", "--data", "{w}/e.txt"], write("e.txt", b" \n\t "), "is empty"),
    (["eval", "{dense}", "--data", "{w}/late.txt"], nul_late, "looks binary"),
    (["eval", "{dense}", "--data", "{w}/l1.txt"], write("l1.txt", b"caf\xe9 au lait"), "not UTF-8"),
    (["eval", "{dense}", "--data", "builtin:nope"], None, "unknown built-in"),
    (["eval", "{dense}", "--data", "x\x00y"], None, "not a usable file name"),
    # eval options
    (D + ["--window", "4096"], None, "larger than the model's context (256)"),
    (D + ["--window", "1"], None, "too small"),
    (D + ["--window", "abc"], None, "argument --window"),
    (D + ["--max-tokens", "1"], None, "--max-tokens 1 is too small"),
    (D + ["--max-tokens", "0"], None, "argument --max-tokens"),
    (D + ["--max-tokens", "-5"], None, "argument --max-tokens"),
    (E + ["--density", "nan"], None, "argument --density"),
    (E + ["--density", "inf"], None, "argument --density"),
    (E + ["--density", "0"], None, "argument --density"),
    (E + ["--density", "1e400"], None, "argument --density"),
    (D + ["--density", "0.5"], None, "routed models only"),
    (D + ["--json", "{w}/out"], None, "is a directory"),
    (D + ["--json", "{w}/text.txt/r.json"], None, "is a file"),
    (["eval", "{dense}"], None, "required"),
    (["frobnicate"], None, "invalid choice"),
    # generate
    (["generate", "{dense}", "hi", "--temperature", "nan"], None, "argument --temperature"),
    (["generate", "{dense}", "hi", "--temperature", "inf"], None, "argument --temperature"),
    (["generate", "{dense}", "hi", "--temperature", "-1"], None, "is negative"),
    (["generate", "{dense}", "hi", "--max-new-tokens", "100000"], None, "does not fit the model's context"),
    (["generate", "{dense}", "word " * 400, "--max-new-tokens", "8"], None, "exceed the model's context"),
    (["generate", "{dense}", "hi", "--max-new-tokens", "250"], None, "exceed the model's context"),
    (["generate", "{dense}", "   "], None, "prompt is empty"),
    (["generate", "{dense}", "a\x00b"], None, "NUL"),
    (["generate", "{dense}", "hi", "--seed", "-1"], None, "argument --seed"),
    (["generate", "{dense}", "hi", "--seed", str(2**70)], None, "argument --seed"),
    (["generate", "{w}/tiny.gguf", "hi"], truncate("tiny.gguf", 0.9), "is truncated"),
    # convert: outputs that would destroy or mix files
    (["convert", "{dense}", "--calib", "{text}", "-o", "{dense}"], None, "would overwrite the input"),
    (["convert", "{dense}", "--calib", "{text}", "-o", "{dense}/sub"], None, "would overwrite the input"),
    (["convert", "{dense}", "--calib", "{text}", "-o", "{w}"], None, "would overwrite the input"),
    (["convert", "{w}/tiny.gguf", "--calib", "{text}", "-o", "{w}/tiny.gguf"], None, "would overwrite the input"),
    (["convert", "{dense}", "--calib", "{text}", "-o", "{text}"], None, "would overwrite the input"),
    (["convert", "{dense}", "--calib", "{text}", "-o", "{w}/short.txt"], None, "exists and is not a directory"),
    (["convert", "{dense}", "--calib", "{text}", "-o", "{routed}"], None, "not empty"),
    (["convert", "{dense}", "--calib", "{text}", "-o", "{w}/out", "--force"], non_routed_files,
     "not a routed model"),
    (["convert", "{dense}", "--calib", "{text}", "-o", "{w}/short.txt/x"], None, "is a file"),
    (["convert", "{dense}", "--calib", "{w}/missing.txt", "-o", "{w}/new"], None, "no such file"),
    (["convert", "{dense}", "--calib", "{w}/pipe.txt", "-o", "{w}/new"], fifo, "not a regular file"),
    (["convert", "{dense}", "--calib-tokens", "100", "-o", "{w}/new"], None, "less than one calibration window"),
    (["convert", "{dense}", "--calib-tokens", "10", "-o", "{w}/new"], None, "calib_tokens: must be >= 64"),
    (["convert", "{dense}", "--density", "1.5", "-o", "{w}/new"], None, "argument --density"),
    (["convert", "{dense}", "--density", "-0", "-o", "{w}/new"], None, "argument --density"),
    (["convert", "{routed}", "-o", "{w}/new"], None, "already a routed model"),
    (["convert", "{dense}", "--calib", "{w}/short.txt", "--calib-tokens", "600", "-o", "{w}/new"], None,
     "fewer than one window"),
    # bench
    (["bench", "{dense}", "--batch", "0"], None, "--batch"),
    (["bench", "{dense}", "--batch", "1,x"], None, "--batch"),
    (["bench", "{dense}", "--batch", "100000"], None, "--batch"),
    (["bench", "{dense}", "--new-tokens", "1"], None, "at least 2"),
    (["bench", "{dense}", "--kernel", "nope"], None, "--kernel"),
    (["bench", "{dense}", "--prompt-tokens", "200", "--new-tokens", "100"], None, "exceed the model's context"),
    (["bench", "{dense}", "--json", "{w}/out"], None, "is a directory"),
    (["demo", "--model", "{routed}"], None, "already a routed model"),
    (["demo", "--density", "nan"], None, "argument --density"),
]


@pytest.mark.parametrize("argv, damage, message", CASES, ids=[f"{i}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(argv, damage, message, world, capsys):
    if damage is not None:
        damage(world)
    before = snapshot(world)
    names = {"w": str(world), "dense": str(world / "dense"), "routed": str(world / "routed"),
             "text": str(world / "text.txt")}
    code = main([a.format(**names) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "it/s]" not in ln and "s/it]" not in ln]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("adaroute: error: "), lines
    assert message in lines[0], lines[0]
    assert snapshot(world) == before


def test_bad_threads_variable_is_one_line(world, capsys, monkeypatch):
    monkeypatch.setenv("ADAROUTE_THREADS", "many")
    assert main(["eval", str(world / "dense"), "--data", str(world / "text.txt")]) == 2
    assert "ADAROUTE_THREADS='many'" in capsys.readouterr().err


def test_version_and_help_exit_0(capsys):
    from adaroute import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"adaroute {__version__}"
    assert main(["generate", "--help"]) == 0
    assert "(default 128)" in capsys.readouterr().out
