"""Weight formats through the CLI: convert records one, runtime_weights builds it, eval and bench run at it."""

import dataclasses
import json
import math

import pytest
import torch

from adaroute.cli import main
from adaroute.errors import AdarouteError
from adaroute.kernels.quant_reference import QuantWeight
from adaroute.runtime import Engine, ExecutionPolicy
from adaroute.runtime.formats import model_format, parse_format, runtime_weights
from adaroute.runtime.quant_weights import quantise
from adaroute.runtime.weights import from_model
from tests.fixtures import write_hf_dir


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if "it/s]" not in ln]  # progress bars may precede it
    assert len(lines) == 1, lines
    return lines[0]


def _logits(engine, ids):
    return engine.forward(ids, engine.new_cache(1, ids.shape[1]), all_logits=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(write_hf_dir(tmp_path_factory.mktemp("tiny") / "m", seed=0))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "some.txt"
    path.write_text("Lists are mutable sequences. Tuples are immutable sequences. Sets hold unique items. " * 20)
    return str(path)


def _convert(tiny_dir, out, weights: str) -> str:
    """The tiny model converted through the CLI with --weights ``weights`` --no-adapt (quick preset,
    made small); returns what convert printed."""
    import contextlib
    import io

    from adaroute.config import _TRAIN_PRESETS

    small = dict(_TRAIN_PRESETS["quick"], calib_tokens=512, window=64, sensitivity_tokens=128)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_TRAIN_PRESETS, "quick", small)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["convert", tiny_dir, "--preset", "quick", "--no-adapt", "--weights", weights,
                         "--density", "0.5", "-o", str(out)])
    assert code == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def q8_dir(tiny_dir, tmp_path_factory):
    """(directory converted at --weights q8, what convert printed): stored as q8_0 blocks."""
    out = tmp_path_factory.mktemp("conv") / "routed-q8"
    return out, _convert(tiny_dir, out, "q8")


@pytest.fixture(scope="module")
def f32_dir(tiny_dir, tmp_path_factory):
    """The same conversion at f32: a float32 directory, which runs at any format."""
    out = tmp_path_factory.mktemp("conv") / "routed-f32"
    _convert(tiny_dir, out, "f32")
    return out


def test_format_names():
    assert [parse_format(n) for n in ("f32", "q8", "q8_0", "q4", "q4_1", "q4_0", "Q8", None)] == [
        "f32", "q8_0", "q8_0", "q4_1", "q4_1", "q4_0", "q8_0", "f32"]
    with pytest.raises(AdarouteError, match=r"--weights 'q5' is not a weight format: choose f32, q8"):
        parse_format("q5")


def test_convert_records_q8_and_the_directory_runs_at_it(q8_dir):
    out, printed = q8_dir
    assert "weights q8_0" in printed  # the budget line says the format before the work starts
    assert any(line.split()[:2] == ["weights", "q8_0"] for line in printed.splitlines())  # and the summary
    meta = json.loads((out / "config.json").read_text())["adaroute"]
    assert meta["weights"] == "q8_0" and all(e["adapter_rank"] == 0 for e in meta["layers"])
    assert json.loads((out / "calibration.json").read_text())["weights"] == "q8_0"

    from adaroute.models import inspect_model, load_model
    from adaroute.routing import routed_modules
    from adaroute.routing.quality import dense_policies
    from adaroute.runtime.checkpoint import read_index

    assert meta["format_version"] == 3 and read_index(out / "model.safetensors")  # the blocks are stored
    model, _ = load_model(str(out))
    fmt = model_format(inspect_model(str(out)))
    assert fmt == "q8_0"
    w = runtime_weights(model, fmt)
    assert w.routed  # (quant_weights.weight_format reads dense FFNs only)
    assert all(isinstance(m, QuantWeight) and m.fmt == "q8_0"
               for ly in w.layers for m in (ly.wq, ly.wk, ly.wv, ly.wo, ly.ffn.w_gate, ly.ffn.w_up, ly.ffn.w_down_t))
    assert isinstance(w.head, QuantWeight) and isinstance(w.embed, QuantWeight)
    ids = torch.arange(3, 40)[None]
    got = _logits(Engine(w, policy=ExecutionPolicy.always_dense()), ids)
    with dense_policies(routed_modules(model)), torch.no_grad():
        ref = model(ids).logits  # the loaded module holds the same blocks dequantised
    # (the g16 kernels round activations to int16 per block of 32: a few 1e-4 on these logits)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-3)


def test_directories_without_the_field_run_at_f32_and_bad_values_are_one_line(f32_dir, q8_dir, tmp_path, capsys):
    import shutil

    from adaroute.models import inspect_model

    out = f32_dir
    old = tmp_path / "old"
    shutil.copytree(out, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["adaroute"]["weights"]  # as written before formats were recorded
    (old / "config.json").write_text(json.dumps(cfg))
    assert model_format(inspect_model(str(old))) == "f32"
    assert model_format(inspect_model(str(old)), "q4") == "q4_1"  # a request overrides the default
    cfg["adaroute"]["weights"] = "q5_k"
    (old / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(old), "--data", "builtin:heldout"]) == 2
    line = _error_line(capsys)
    assert "weights 'q5_k' is not one of f32, q8_0, q4_0, q4_1" in line and "config.json" in line
    blocks = tmp_path / "blocks"
    shutil.copytree(q8_dir[0], blocks)
    cfg = json.loads((blocks / "config.json").read_text())
    cfg["adaroute"]["weights"] = "f32"  # blocks in the file, f32 in the config
    (blocks / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(blocks), "--data", "builtin:heldout"]) == 2
    assert "weights says f32 but model.safetensors holds blocks" in _error_line(capsys)


@pytest.mark.parametrize("command", ["convert", "eval", "bench"])
def test_bad_format_name_is_one_line_and_exit_2(command, tiny_dir, tmp_path, capsys):
    argv = {"convert": ["convert", tiny_dir, "-o", str(tmp_path / "out"), "--no-adapt"],
            "eval": ["eval", tiny_dir, "--data", "builtin:heldout"], "bench": ["bench", tiny_dir]}[command]
    assert main([*argv, "--weights", "int3"]) == 2
    line = _error_line(capsys)
    assert line == ("adaroute: error: --weights 'int3' is not a weight format: choose f32, q8 (= q8_0), "
                    "q4 (= q4_1) or q4_0")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapted_dir(f32_dir, tmp_path_factory):
    """The converted model with rank-2 routing adapters added, saved at f32."""
    from adaroute.config import RoutingConfig
    from adaroute.models import load_model
    from adaroute.routing import routed_modules, save_routed

    model, tokenizer = load_model(str(f32_dir))
    gen = torch.Generator().manual_seed(0)
    for m in routed_modules(model):
        m.add_adapter(2, gen)
        with torch.no_grad():  # reset() starts B at zero (a no-op): give the adapter an effect
            for p in m.adapter.parameters():
                p.normal_(0, 0.2, generator=gen)
    out = tmp_path_factory.mktemp("adapted") / "routed"
    save_routed(model, tokenizer, out, "tiny", RoutingConfig())
    return out, model


def test_adapters_run_at_quantised_formats(adapted_dir, text_file):
    """Routing adapters stay float32 and apply to the selected quantised units (exact router): the
    runtime weights at q8 keep them, the routed engine's logits differ from the same weights without
    them, and eval/bench run the directory at q4."""
    out, model = adapted_dir
    weights = runtime_weights(model, "q8")
    ffn = weights.layers[0].ffn
    assert ffn.adapter is not None and ffn.shadow_q.numel() == 0
    bare = dataclasses.replace(weights, layers=[dataclasses.replace(ly, ffn=dataclasses.replace(ly.ffn, adapter=None))
                                                for ly in weights.layers])
    ids = torch.tensor([[3, 5, 7, 11]])
    logits = [Engine(w, policy=ExecutionPolicy.always_sparse()).forward(ids, Engine(w).new_cache(1, 8))
              for w in (weights, bare)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    assert main(["eval", str(out), "--data", text_file, "--weights", "q4", "--window", "32", "--max-tokens", "64"]) == 0
    assert main(["bench", str(out), "--weights", "q4", "--new-tokens", "4", "--prompt-tokens", "4",
                 "--repeats", "1"]) == 0


def _runtime_ppl(weights, tokenizer, text, window, max_tokens, policy):
    from adaroute.eval.perplexity import text_windows, window_nll

    engine = Engine(weights, policy=policy)
    engine.failsafe = None
    nll = scored = 0
    for w in text_windows(tokenizer, text, window, max_tokens):
        nll += window_nll(_logits(engine, w), w).item()
        scored += w.shape[1] - 1
    return math.exp(nll / scored)


def test_eval_routed_directory_runs_at_its_recorded_format(q8_dir, f32_dir, text_file, tmp_path, capsys):
    from adaroute.models import load_model

    out, _ = q8_dir
    result = tmp_path / "q8.json"
    assert main(["eval", str(out), "--data", text_file, "--max-tokens", "96", "--window", "32",
                 "--json", str(result)]) == 0
    printed = capsys.readouterr().out
    assert "weights: q8_0" in printed and "ppl routed" in printed
    payload = json.loads(result.read_text())
    rec = payload["results"][0]
    assert payload["weights"] == "q8_0" and rec["weights"] == "q8_0" and rec["tokens"] == 96
    # the numbers are the runtime's on the directory's q8_0 blocks, dense and routed (every token sparse)
    from adaroute.runtime.checkpoint import load_weights

    _, tokenizer = load_model(str(out))
    w = load_weights(out)
    text = open(text_file).read()
    dense = _runtime_ppl(w, tokenizer, text, 32, 96, ExecutionPolicy.always_dense())
    routed = _runtime_ppl(w, tokenizer, text, 32, 96, ExecutionPolicy.always_sparse())
    # (rel 1e-4: the threaded kernels' summation order; q8_0 moves these perplexities by far more, below)
    assert rec["perplexity_dense"] == pytest.approx(dense, rel=1e-4)
    assert rec["perplexity_routed"] == pytest.approx(routed, rel=1e-4) and rec["perplexity"] == rec["perplexity_routed"]
    assert rec["perplexity_ratio"] == pytest.approx(routed / dense, rel=1e-4)
    assert 0 < rec["mean_density"] < 1 and 0 <= rec["top1_agreement"] <= 1
    # at q8 the exact router reads gate/up whole and applies the whole down projection to the masked
    # activations: every FFN byte plus the units' biases
    assert 1 < rec["ffn_bytes_share"] < 1.05 and len(rec["layer_density"]) == 2
    assert payload["total"]["perplexity_routed"] == pytest.approx(rec["perplexity_routed"], rel=1e-9)

    # the float32 directory of the same conversion (deterministic under its seed), quantised when
    # loaded: the same numbers, since the stored blocks are the ones made at load time
    quantised = tmp_path / "f32-at-q8.json"
    assert main(["eval", str(f32_dir), "--data", text_file, "--max-tokens", "96", "--window", "32",
                 "--weights", "q8", "--json", str(quantised)]) == 0
    again = json.loads(quantised.read_text())["results"][0]
    capsys.readouterr()
    for key in ("perplexity_dense", "perplexity_routed", "mean_density"):
        assert again[key] == pytest.approx(rec[key], rel=1e-4), key

    # --weights f32 on the float32 directory: its routed output head runs in the runtime engine; with
    # --head-rows 0 (the exact head) the loaded model computes them, as before formats existed
    f32 = tmp_path / "f32.json"
    assert main(["eval", str(f32_dir), "--data", text_file, "--max-tokens", "96", "--window", "32",
                 "--weights", "f32", "--json", str(f32)]) == 0
    out_text = capsys.readouterr().out
    assert "weights:" not in out_text and "routed head: 256 exact rows per token" in out_text
    assert json.loads(f32.read_text())["results"][0]["weights"] == "f32"
    assert main(["eval", str(f32_dir), "--data", text_file, "--max-tokens", "96", "--window", "32",
                 "--weights", "f32", "--head-rows", "0", "--json", str(f32)]) == 0
    assert "routed head" not in capsys.readouterr().out
    ref = json.loads(f32.read_text())
    assert ref["weights"] == "f32" and "weights" not in ref["results"][0]
    assert ref["results"][0]["perplexity_dense"] != pytest.approx(rec["perplexity_dense"], rel=1e-3)
    assert ref["results"][0]["perplexity_dense"] == pytest.approx(rec["perplexity_dense"], rel=0.05)

    # the blocks run only at their format: anything else is a one-line error
    assert main(["eval", str(out), "--data", text_file, "--max-tokens", "96", "--weights", "f32"]) == 2
    line = _error_line(capsys)
    assert "stores its weights as q8_0 blocks and runs only at that format" in line and "--weights" in line


def test_runtime_comparison_at_f32_matches_the_model_s_own(f32_dir, text_file):
    """The runtime path eval takes at q8/q4, given f32 weights, reproduces the loaded model's numbers."""
    from adaroute.models import load_model
    from adaroute.routing.quality import compare_with_dense, compare_with_dense_runtime

    model, tokenizer = load_model(str(f32_dir))
    text = open(text_file).read()
    ours = compare_with_dense_runtime(runtime_weights(model, "f32"), model, tokenizer, text, 32, 96)
    ref = compare_with_dense(model, tokenizer, text, 32, 96)
    for key in ("perplexity_dense", "perplexity_routed", "mean_density", "ffn_bytes_share", "router_bytes_share",
                "ffn_flops_share"):
        assert ours[key] == pytest.approx(ref[key], rel=2e-3), key
    assert ours["tokens"] == ref["tokens"] and ours["windows"] == ref["windows"]


def test_eval_dense_model_at_q4(tiny_dir, text_file, tmp_path, capsys):
    from adaroute.models import load_model

    result = tmp_path / "q4.json"
    assert main(["eval", tiny_dir, "--data", text_file, "--max-tokens", "64", "--window", "32", "--weights", "q4",
                 "--json", str(result)]) == 0
    assert "weights: q4_1" in capsys.readouterr().out
    rec = json.loads(result.read_text())["results"][0]
    model, tokenizer = load_model(tiny_dir)
    expected = _runtime_ppl(quantise(from_model(model), "q4_1"), tokenizer, open(text_file).read(), 32, 64,
                            ExecutionPolicy.always_dense())
    assert rec["weights"] == "q4_1" and rec["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_bench_routed_directory_at_q4(f32_dir, tmp_path, capsys):
    out = f32_dir
    result = tmp_path / "b.json"
    assert main(["bench", str(out), "--weights", "q4", "--new-tokens", "4", "--prompt-tokens", "8", "--repeats", "1",
                 "--json", str(result)]) == 0
    printed = capsys.readouterr().out
    assert "adaroute-routed q4_1" in printed and "weights: q4_1" in printed
    payload = json.loads(result.read_text())
    records = {r["engine"]: r for r in payload["records"]}
    assert payload["weights"] == "q4_1"
    assert list(records) == ["transformers-eager", "adaroute-dense q4_1", "adaroute-routed q4_1"]
    dense, routed = records["adaroute-dense q4_1"], records["adaroute-routed q4_1"]
    eager = records["transformers-eager"]
    assert dense["vs_dense"] == 1.0 and routed["vs_dense"] is not None and 0 < routed["density"] < 1
    assert dense["weight_mb_per_step"] < eager["weight_mb_per_step"] / 3  # 4-bit blocks vs float32


def test_bench_default_is_the_recorded_format(q8_dir, tmp_path, capsys):
    out, _ = q8_dir
    result = tmp_path / "b.json"
    assert main(["bench", str(out), "--new-tokens", "3", "--prompt-tokens", "8", "--repeats", "1",
                 "--json", str(result)]) == 0
    engines = [r["engine"] for r in json.loads(result.read_text())["records"]]
    assert engines == ["transformers-eager", "adaroute-dense q8_0", "adaroute-routed q8_0"]
