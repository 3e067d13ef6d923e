import json
import subprocess
import sys

import pytest

from adaroute.cli import main
from tests.fixtures import write_gguf, write_hf_dir


def _error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if "it/s]" not in ln]  # progress bars may precede it
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(write_hf_dir(tmp_path_factory.mktemp("tiny") / "m", seed=0))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "some.txt"
    path.write_text("Lists are mutable sequences. Tuples are immutable sequences. " * 20)
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "no/such/model", "--data", "builtin:heldout"], "no such model"),
        (["eval", "{tiny}", "--data", "missing.txt"], "no such file: missing.txt"),
        (["eval", "{tiny}", "--data", "{empty}"], "is empty"),
        (["eval", "{tiny}", "--data", "{binary}"], "looks binary"),
        (["eval", "{tiny}", "--data", "{text}", "--window", "4096"], "larger than the model's context (256)"),
        (["eval", "{tmp}", "--data", "{text}"], "is a directory but not a model"),
        (["generate", "{tiny}", "  "], "prompt is empty"),
        (["generate", "{tiny}", "hi", "--temperature", "-1"], "is negative"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, tiny_dir, text_file):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x00\x01")
    (tmp_path / "sub").mkdir()
    names = {"tiny": tiny_dir, "empty": str(tmp_path / "empty.txt"), "binary": str(tmp_path / "bin.txt"),
             "text": text_file, "tmp": str(tmp_path / "sub")}
    assert main([a.format(**names) for a in argv]) == 2
    line = _error_line(capsys)
    assert line.startswith("adaroute: error: ") and message in line


def test_debug_shows_the_exception():
    from adaroute import AdarouteError

    with pytest.raises(AdarouteError):
        main(["--debug", "eval", "no/such/model", "--data", "builtin:heldout"])


def test_console_script_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "adaroute", "eval", "nope", "--data", "builtin:heldout"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("adaroute: error: no such model") and "Traceback" not in proc.stderr


def test_eval_writes_json_per_file_and_total(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", tiny_dir, "--data", text_file, text_file, "--window", "64", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    first, total = payload["results"][0], payload["total"]
    assert {"model", "perplexity", "tokens", "window", "seconds"} <= set(first)
    assert total["tokens"] == 2 * first["tokens"]
    assert total["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
    assert "perplexity" in capsys.readouterr().out


def test_generate_from_gguf_is_deterministic(tmp_path, capsys):
    path = str(write_gguf(tmp_path / "t.gguf", seed=2))
    assert main(["generate", path, "Hello there", "--max-new-tokens", "8"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", path, "Hello there", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == first
