"""convert(): dense directory -> routed directory -> load -> compare with dense."""

from pydoc_data.topics import topics

import pytest
import torch

from adaroute.routing import RoutedMLP
from adaroute.routing.quality import compare_with_dense
from tests.fixtures import convert_tiny, write_hf_dir


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("convert"))


def test_directory_is_self_contained_and_loads_routed(converted):
    from adaroute import load_model

    result, out = converted
    for name in ("model.safetensors", "config.json", "calibration.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    model, tok = load_model(str(out))
    assert all(isinstance(l.mlp, RoutedMLP) for l in model.model.layers)
    ids = tok("def f(x): return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.model(ids).logits)


def test_compare_with_dense_reports_quality_and_cost(converted):
    result, _ = converted
    text = topics["lambda"] + topics["while"]
    r = compare_with_dense(result.model, result.tokenizer, text, window=64, max_tokens=256)
    assert r["perplexity_ratio"] > 0 and 0 <= r["top1_agreement"] <= 1
    assert 0.2 < r["mean_density"] < 0.8
    assert r["ffn_bytes_share"] == pytest.approx(r["mean_density"] + r["router_bytes_share"])
    assert r["units_per_token"]["std"] > 0
    dense = compare_with_dense(result.model, result.tokenizer, text, window=64, max_tokens=256, density=1.0)
    assert dense["perplexity_ratio"] == 1.0 and dense["top1_agreement"] == 1.0
    assert dense["ffn_bytes_share"] == 1.0


def test_calibration_record(converted):
    result, _ = converted
    cal = result.calibration
    assert cal["seed"] == 0 and len(cal["layer_density"]) == 2
    assert abs(cal["calib_stats"]["mean_density"] - 0.5) < 0.01


def test_cli_convert_writes_a_directory(tmp_path, capsys):
    from adaroute.cli import main

    write_hf_dir(tmp_path / "dense")
    calib = tmp_path / "calib.txt"
    calib.write_text(topics["class"] + topics["import"])
    code = main(["convert", str(tmp_path / "dense"), "--calib", str(calib), "--density", "0.6", "--preset", "quick",
                 "--calib-tokens", "512", "-o", str(tmp_path / "out")])
    assert code == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "mean density" in capsys.readouterr().out


def test_cli_convert_bad_density_is_one_line_error(tmp_path, capsys):
    from adaroute.cli import main

    write_hf_dir(tmp_path / "dense")
    assert main(["convert", str(tmp_path / "dense"), "--density", "1.5"]) == 2
    assert "density" in capsys.readouterr().err


def test_cli_force_replaces_a_routed_directory_whole(tmp_path, capsys):
    from adaroute.cli import main

    write_hf_dir(tmp_path / "dense")
    out = tmp_path / "routed"
    argv = ["convert", str(tmp_path / "dense"), "--preset", "quick", "--calib-tokens", "512", "-o", str(out)]
    assert main(argv) == 0
    (out / "stale.txt").write_text("from an earlier run")
    assert main(argv) == 2 and "add --force" in capsys.readouterr().err
    assert (out / "stale.txt").exists()
    assert main([*argv, "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "routed"]  # no temporary left behind


def test_cli_eval_of_a_routed_directory_reports_the_spread_over_windows(converted, tmp_path, capsys):
    import json

    from adaroute.cli import main

    _, out = converted
    text = tmp_path / "text.txt"
    text.write_text(topics["lambda"] + topics["while"] + topics["for"])
    js = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", str(text), "--window", "64", "--max-tokens", "512",
                 "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    rec = json.loads(js.read_text())["results"][0]
    spread = rec["window_spread"]
    assert rec["windows"] > 1
    # the file's ratio is a token-weighted mean of the windows' log-ratios
    assert spread["ratio_min"] <= rec["perplexity_ratio"] <= spread["ratio_max"]
    assert f"per-window ratio {spread['ratio_min']:.3f}-{spread['ratio_max']:.3f}" in printed
