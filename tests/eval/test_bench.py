"""The speed bench on a tiny model: records, table and JSON (speed itself is not asserted)."""

import json

import pytest

from adaroute.eval.bench import (
    RssSampler,
    build_engines,
    format_table,
    run_engines,
    write_json,
)
from tests.fixtures import make_tiny_llama


@pytest.fixture(scope="module")
def records():
    model = make_tiny_llama(seed=1)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    return run_engines(build_engines(model, max_len=64), prompts, new_tokens=6, repeats=2, warmup_tokens=2)


def test_one_record_per_engine(records):
    assert [r.engine for r in records] == ["transformers-eager", "adaroute-dense"]
    for r in records:
        assert r.batch == 2 and r.repeats == 2
        assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0
        assert 0 < r.latency_p50_ms <= r.latency_p95_ms
        assert r.peak_rss_mb > 0 and r.engine_mb > 0


def test_routed_model_adds_a_routed_engine():
    routing = pytest.importorskip("adaroute.routing")
    model = make_tiny_llama(seed=1)
    for m in routing.route_model(model):
        m.threshold, m.min_units = -5.0, 4
    engines = build_engines(model, max_len=32)
    recs = run_engines(engines, [[1, 2, 3]], new_tokens=4, repeats=1, warmup_tokens=2)
    routed = [r for r in recs if r.engine == "adaroute-routed"]
    assert len(routed) == 1 and 0 < routed[0].density < 1
    dense = next(r for r in recs if r.engine == "adaroute-dense")
    # the dense engine reads no router; the ideal ratio is the byte ratio, the achieved one the speed ratio
    assert dense.weight_mb_per_step == next(r for r in recs if r.engine == "transformers-eager").weight_mb_per_step
    assert routed[0].ideal_vs_dense == round(dense.weight_mb_per_step / routed[0].weight_mb_per_step, 3)
    assert routed[0].vs_dense == round(routed[0].decode_tokens_per_s / dense.decode_tokens_per_s, 3)
    # two sequences in flight run dense under the default policy: no density, dense bytes
    recs = run_engines(engines, [[1, 2, 3], [4, 5, 6]], new_tokens=4, repeats=1, warmup_tokens=2)
    routed = next(r for r in recs if r.engine == "adaroute-routed")
    assert routed.density is None and routed.weight_mb_per_step == dense.weight_mb_per_step


def test_dense_baseline_is_the_original_layout_or_the_arm():
    """adaroute-dense on a routed model: the dense model's own layout (FFN copies), or its dense arm."""
    routing = pytest.importorskip("adaroute.routing")
    from adaroute.runtime.weights import DenseFFN, RoutedFFN

    model = make_tiny_llama(seed=1)
    routing.route_model(model)
    by_name = {b: {e.name: e for e in build_engines(model, max_len=32, dense_baseline=b)} for b in ("original", "arm")}
    original, arm = by_name["original"]["adaroute-dense"], by_name["arm"]["adaroute-dense"]
    assert all(isinstance(ly.ffn, DenseFFN) for ly in original.weights.layers)
    assert all(isinstance(ly.ffn, RoutedFFN) for ly in arm.weights.layers)
    routed = by_name["arm"]["adaroute-routed"].weights
    assert arm.weights.layers[0].ffn.w_gate.data_ptr() == routed.layers[0].ffn.w_gate.data_ptr()  # no copy
    with pytest.raises(ValueError, match="dense_baseline"):
        build_engines(model, max_len=32, dense_baseline="fast")


def test_table_and_json(records, tmp_path):
    table = format_table(records)
    assert "adaroute-dense" in table and "1.00x" in table
    out = tmp_path / "bench.json"
    write_json(records, str(out), {"threads": 1})
    data = json.loads(out.read_text())
    assert {r["engine"] for r in data["records"]} == {"transformers-eager", "adaroute-dense"}
    assert all("decode_tokens_per_s" in r for r in data["records"])


def test_rss_sampler_sees_an_allocation():
    import torch

    sampler = RssSampler(interval_s=0.001)
    with sampler.watch():
        big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, touched
        del big
    assert sampler.peak > 64 << 20


def test_cli_bench_writes_json(tmp_path, capsys):
    import argparse

    from adaroute.cli import bench as cli_bench
    from tests.fixtures import write_hf_dir

    write_hf_dir(tmp_path / "tiny")
    parser = argparse.ArgumentParser()
    cli_bench.add_parser(parser.add_subparsers())
    out = tmp_path / "b.json"
    args = parser.parse_args(["bench", str(tmp_path / "tiny"), "--batch", "1,2", "--new-tokens", "4",
                              "--prompt-tokens", "8", "--repeats", "1", "--dense-baseline", "arm", "--json", str(out)])
    assert args.run(args) == 0
    data = json.loads(out.read_text())
    assert data["dense_baseline"] == "arm"
    records = data["records"]
    assert [(r["engine"], r["batch"]) for r in records] == [
        ("transformers-eager", 1), ("adaroute-dense", 1), ("transformers-eager", 2), ("adaroute-dense", 2)]
    assert "decode tok/s" in capsys.readouterr().out


def test_cli_bench_rejects_bad_batches():
    from adaroute.cli.bench import parse_batches
    from adaroute.errors import AdarouteError

    assert parse_batches("1,4") == [1, 4]
    with pytest.raises(AdarouteError, match="--batch"):
        parse_batches("1,x")


def test_cli_bench_needs_two_new_tokens(tmp_path, capsys):
    from adaroute.cli import main
    from tests.fixtures import write_hf_dir

    write_hf_dir(tmp_path / "tiny")
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "tiny"), "--new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--new-tokens" in err[0] and "Traceback" not in err[0]
