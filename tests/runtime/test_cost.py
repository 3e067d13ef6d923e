"""The cost module: bytes and FLOPs per token for every format and path, counted by hand."""

import pytest
import torch

from adaroute.report.measure import capacity
from adaroute.routing import LayerPolicy
from adaroute.routing.quality import cost_shares
from adaroute.runtime import cost
from adaroute.runtime.quant_weights import quantise
from adaroute.runtime.weights import RoutedFFN, from_model
from tests.routing.test_adapter import adapted_copy


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def routed_layer(w):
    return next(ly.ffn for ly in w.layers if isinstance(ly.ffn, RoutedFFN))


def test_float32_sparse_layer_by_hand():
    model, _ = adapted_copy(1, rank=4)
    f = routed_layer(from_model(model))
    units, hidden, r = f.w_gate.shape[0], f.w_gate.shape[1], 4
    b, fl = cost.ffn_cost(f, 0.25)
    assert b["ffn"] == 0.25 * 3 * units * hidden * 4
    assert b["router"] == units * hidden + nbytes(f.shadow_scale) + 4 * units  # int4 codes of gate and up
    assert b["adapter"] == 4 * (3 * r * hidden + 0.25 * 3 * units * r)
    assert fl == {"ffn": 0.25 * 6 * units * hidden, "router": 4 * units * hidden,
                  "adapter": 2 * (3 * r * hidden + 0.25 * 3 * units * r)}
    dense_b, dense_f = cost.ffn_cost(f, None)  # the dense policy: no router, no adapter
    assert dense_b == {"ffn": 3 * units * hidden * 4, "router": 0, "adapter": 0}
    assert dense_f["ffn"] == 6 * units * hidden
    assert cost.unit_bytes(f) == 4 * 3 * (hidden + r)  # a unit's three rows and its 3r adapter values
    assert cost.router_share(f) == (b["router"] + 4 * 3 * r * hidden) / (3 * units * hidden * 4)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_exact_router_reads_every_byte_at_q8_q4(fmt):
    model, _ = adapted_copy(1, rank=4)
    q = quantise(from_model(model), fmt)
    f = routed_layer(q)
    units, hidden = f.w_gate.shape
    assert f.dense_down
    b, fl = cost.ffn_cost(f, 0.3)
    assert b["ffn"] == nbytes(f.w_down_t)  # the down projection whole, whatever is selected
    assert b["router"] == nbytes(f.w_gate, f.w_up, f.unit_bias)
    assert fl["ffn"] == 2 * units * hidden and fl["router"] == 4 * units * hidden
    assert cost.unit_bytes(f) == 3 * 4 * f.adapter.w_units.element_size()  # only the adapter's values
    dense = sum(cost.ffn_cost(f, None)[0].values())
    assert sum(b.values()) == dense + nbytes(f.unit_bias) + nbytes(f.adapter.w_in, f.adapter.w_out) \
        + 0.3 * nbytes(f.adapter.w_units)


@pytest.mark.parametrize("fmt", [None, "q4_1"])
def test_capacity_adds_up_to_the_byte_model(fmt):
    """The report's per-token bytes (fixed + units × bytes per unit) equal the runtime's byte model."""
    model, mods = adapted_copy(2, rank=4)
    w = from_model(model) if fmt is None else quantise(from_model(model), fmt)
    cap = capacity(model) if fmt is None else None
    fixed = sum(cost.weight_bytes(w, 0.0).values())
    units = mods[0].units
    for d in (0.25, 0.5):
        per_unit = sum(d * units * cost.unit_bytes(w.layers[m.layer_idx].ffn) for m in mods)
        assert fixed + per_unit == pytest.approx(sum(cost.token_cost(w, d)[0].values()))
    if cap is not None:
        assert cap["fixed"] == fixed and cap["dense"] == sum(cost.weight_bytes(w).values())
        assert cap["unit_bytes"] == {m.layer_idx: cost.unit_bytes(w.layers[m.layer_idx].ffn) for m in mods}


def test_shares_follow_each_layers_policy():
    """(The adapter's share by hand: tests/routing/test_adapter.py.)"""
    model, mods = adapted_copy(0, rank=4)
    half = cost_shares(model, mods, {m.layer_idx: 0.5 for m in mods})
    assert 0.5 < half["ffn_bytes_share"] < 0.7 and half["ffn_flops_share"] > 1.1  # int4 scoring: 2/3 of the MACs
    m = mods[0]
    m.set_policy(LayerPolicy.dense(m.units))
    one_dense = cost_shares(model, mods[:1], {m.layer_idx: 1.0})
    assert one_dense == {"ffn_bytes_share": 1.0, "router_bytes_share": 0.0, "adapter_bytes_share": 0.0,
                         "ffn_flops_share": 1.0}


def test_token_cost_takes_densities_per_layer():
    model, mods = adapted_copy(0, rank=4)
    w = from_model(model)
    first, second = (m.layer_idx for m in mods[:2])
    mixed = cost.token_cost(w, {first: 0.25})[0]  # the other layer runs dense
    by_hand = cost.ffn_cost(w.layers[first].ffn, 0.25)[0]["ffn"] + cost.ffn_cost(w.layers[second].ffn, None)[0]["ffn"]
    assert mixed["ffn"] == by_hand
    assert torch.tensor(list(mixed.values())).sum() < sum(cost.token_cost(w, None)[0].values())


def test_scoring_copy_bytes_are_the_g16_copies_and_the_budget_decides_it(monkeypatch):
    import dataclasses

    from adaroute.kernels import cpu
    from adaroute.runtime import Engine, ExecutionPolicy
    from adaroute.runtime.head import routed_head

    model, _ = adapted_copy(1, rank=4)
    w = from_model(model)
    copies = [cpu.shadow_g16(ly.ffn.shadow_q, ly.ffn.shadow_scale) for ly in w.layers if isinstance(ly.ffn, RoutedFFN)]
    assert cost.scoring_copy_bytes(w) == nbytes(*copies) > 0
    dense, routed = (cost.distinct_bytes(cost.held_tensors(w, r)) for r in (False, True))
    need = (routed + cost.scoring_copy_bytes(w)) / dense - 1  # the share the copies would take the engine to
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    outputs = []
    for budget, fits in ((need + 0.01, True), (need - 0.01, False)):
        monkeypatch.setattr(cost, "MEMORY_BUDGET", budget)
        assert cost.scoring_copy_fits(w) is fits
        engine = Engine(w, policy=ExecutionPolicy.always_sparse())
        assert engine.scoring_copy is fits and (len(engine.made_tensors) > 0) is fits
        cache = engine.new_cache(1, 8)
        outputs.append(torch.stack([engine.forward(ids[:, i:i + 1], cache)[0] for i in range(8)]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)  # the same scores either way
    # the routed head's shadow counts against the same budget
    with_head = dataclasses.replace(w, routed_head=routed_head(w.head, 8))
    assert cost.distinct_bytes(cost.held_tensors(with_head, True)) == routed + nbytes(with_head.routed_head.shadow)
    assert cost.distinct_bytes(cost.held_tensors(with_head, False)) == dense
