"""The routed output head: kernel == reference (ties included), the engine's logits are the shadow's
with each token's K best rows exact, the dense policy keeps the exact head, directories carry the
setting, the cost module counts it, and the CLI refuses it where it cannot run."""

import dataclasses
import json

import pytest
import torch

from adaroute.cli import main
from adaroute.config import RoutingConfig
from adaroute.kernels import cpu, quant_reference, reference
from adaroute.routing import load_routed, save_routed
from adaroute.runtime import Engine, ExecutionPolicy, cost, generate
from adaroute.runtime.checkpoint import load_weights
from adaroute.runtime.formats import runtime_weights
from adaroute.runtime.head import RoutedHead, routed_head
from adaroute.runtime.weights import from_model
from tests.fixtures import make_tiny_tokenizer
from tests.routing.test_adapter import adapted_copy


@pytest.mark.parametrize("tokens,rows", [(1, 1), (1, 37), (3, 200), (9, 64), (2, 500)])
def test_kernel_selects_and_computes_the_reference_rows(tokens, rows):
    g = torch.Generator().manual_seed(tokens * 1000 + rows)
    head, x = torch.randn(500, 96, generator=g), torch.randn(tokens, 96, generator=g)
    shadow = torch.randn(tokens, 500, generator=g)
    ref, fast = shadow.clone(), shadow.clone()
    ref_rows, fast_rows = reference.head_rows(x, head, ref, rows), cpu.head_rows(x, head, fast, rows)
    assert cpu.uses_native()
    for t in range(tokens):
        assert sorted(fast_rows[t].tolist()) == sorted(ref_rows[t].tolist())
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    picked = torch.zeros_like(shadow, dtype=torch.bool).scatter_(1, ref_rows, True)
    assert torch.equal(fast[~picked], shadow[~picked])  # every other row keeps its shadow logit
    torch.testing.assert_close(fast.gather(1, ref_rows), (x @ head.T).gather(1, ref_rows), rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_row_in_both():
    g = torch.Generator().manual_seed(1)
    head, x = torch.randn(3000, 64, generator=g), torch.randn(2, 64, generator=g)
    shadow = torch.randint(0, 8, (2, 3000), generator=g).float()  # ~375 rows per value
    ref, fast = shadow.clone(), shadow.clone()
    ref_rows, fast_rows = reference.head_rows(x, head, ref, 500), cpu.head_rows(x, head, fast, 500)
    for t in range(2):
        assert sorted(fast_rows[t].tolist()) == sorted(ref_rows[t].tolist())
        top = shadow[t, ref_rows[t]]
        assert (top >= 6).all()  # the 7s, then the lowest-numbered 6s
        sixes = ref_rows[t][top == 6]
        assert sixes.tolist() == (shadow[t] == 6).nonzero().flatten()[:len(sixes)].tolist()


@pytest.fixture(scope="module")
def adapted():
    return adapted_copy(5)[0]


def _logits(weights, ids, policy, kernel):
    engine = Engine(weights, kernel=kernel, policy=policy)
    return engine.forward(ids, engine.new_cache(1, ids.shape[1]), all_logits=True)[0]


def _with_head(w, rows):
    return dataclasses.replace(w, routed_head=routed_head(w.head, rows))


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_engine_logits_are_the_shadows_with_the_best_rows_exact(adapted, kernel, monkeypatch):
    w = from_model(adapted)
    routed_w = _with_head(w, 24)
    seen = []  # the hidden states the routed head reads (after the final norm)
    logits = RoutedHead.logits
    monkeypatch.setattr(RoutedHead, "logits",
                        lambda self, k, x, head: seen.append(x.clone()) or logits(self, k, x, head))
    ids = torch.arange(3, 19)[None]
    routed = _logits(routed_w, ids, ExecutionPolicy.always_sparse(), kernel)
    exact = _logits(w, ids, ExecutionPolicy.always_sparse(), kernel)  # the same FFNs, the exact head
    shadow = quant_reference.linear(seen[0], routed_w.routed_head.shadow)  # [T, V]
    rows = reference.top_rows(shadow, 24)
    picked = torch.zeros_like(shadow, dtype=torch.bool).scatter_(1, rows, True)
    torch.testing.assert_close(routed[picked], exact[picked], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(routed[~picked], shadow[~picked], rtol=1e-4, atol=1e-4)
    assert torch.equal(routed.argmax(-1), exact.argmax(-1))


def test_dense_policy_keeps_the_exact_head_and_all_rows_is_the_exact_head(adapted):
    w = from_model(adapted)
    ids = torch.arange(5, 25)[None]
    all_rows = _with_head(w, w.head.shape[0])
    few_rows = _with_head(w, 8)
    dense = _logits(w, ids, ExecutionPolicy.always_dense(), "cpu")
    assert torch.equal(_logits(few_rows, ids, ExecutionPolicy.always_dense(), "cpu"), dense)
    sparse = ExecutionPolicy.always_sparse()
    torch.testing.assert_close(_logits(all_rows, ids, sparse, "cpu"), _logits(w, ids, sparse, "cpu"),
                               rtol=1e-5, atol=1e-5)
    engine = Engine(few_rows)  # the default policy: decode with the routed head, greedy as the exact head
    assert generate(engine, [[3, 4, 5]], 12).tokens == generate(Engine(w), [[3, 4, 5]], 12).tokens


def test_no_routed_head_where_it_does_not_apply():
    assert routed_head(torch.randn(50, 64), 0) is None
    assert routed_head(torch.randn(50, 48), 8) is None  # rows not a multiple of 32 values
    assert routed_head(quant_reference.quantize(torch.randn(50, 64), "q8_0"), 8) is None
    assert routed_head(torch.randn(50, 64), 80).rows == 50


def test_directories_carry_the_setting_and_older_ones_have_none(adapted, tmp_path):
    save_routed(adapted, make_tiny_tokenizer(), tmp_path / "h", "tiny", RoutingConfig(head_rows=16))
    loaded, _ = load_routed(tmp_path / "h")
    assert runtime_weights(loaded, None).routed_head.rows == 16
    assert load_weights(tmp_path / "h").routed_head.rows == 16
    save_routed(adapted, make_tiny_tokenizer(), tmp_path / "old", "tiny", RoutingConfig())
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["adaroute"]["routing"]["head_rows"]  # as written before the routed head existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert load_weights(tmp_path / "old").routed_head is None
    assert runtime_weights(load_routed(tmp_path / "old")[0], None).routed_head is None
    save_routed(adapted, make_tiny_tokenizer(), tmp_path / "q", "tiny", RoutingConfig(head_rows=16), weights="q8_0")
    assert load_weights(tmp_path / "q").routed_head is None  # a block head stays exact


def test_cost_counts_the_shadow_and_the_exact_rows_when_routed(adapted):
    w = from_model(adapted)
    routed = _with_head(w, 10)
    v, h = w.head.shape
    assert cost.weight_bytes(routed, 0.5)["head"] == v * h // 32 * 34 + 10 * h * 4  # q8_0 blocks + K float rows
    assert cost.weight_bytes(routed, None)["head"] == v * h * 4 == cost.weight_bytes(w, 0.5)["head"]
    # a routed engine routes the head also when a batch runs every layer dense
    assert cost.weight_bytes(routed, None, routed_head=True)["head"] == cost.weight_bytes(routed, 0.5)["head"]
    assert cost.token_cost(routed, 0.5)[1]["head"] == 2 * v * h + 2 * 10 * h


def test_cli_refuses_a_routed_head_where_it_cannot_run(capsys, tmp_path):
    assert main(["convert", "smollm2-135m", "--weights", "q4", "--head-rows", "64", "-o", str(tmp_path / "x")]) != 0
    assert "--head-rows" in capsys.readouterr().err
    assert main(["eval", "smollm2-135m", "--data", "builtin:heldout", "--head-rows", "64"]) != 0
    err = capsys.readouterr().err
    assert "routed models only" in err and "Traceback" not in err
    assert main(["convert", "smollm2-135m", "--head-rows", "-3", "-o", str(tmp_path / "y")]) != 0
    assert "--head-rows" in capsys.readouterr().err


def test_quantising_weights_drops_the_routed_head(adapted):
    from adaroute.runtime.quant_weights import quantise

    q = quantise(_with_head(from_model(adapted), 16), "q8_0")
    assert q.routed_head is None
    engine = Engine(q)
    assert generate(engine, [[3, 4, 5]], 4).tokens[0]  # decodes on the quantised head
