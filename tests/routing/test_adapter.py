import torch

from adaroute.kernels import reference
from adaroute.routing import LayerPolicy, RoutingStats, collecting
from adaroute.routing.quality import cost_shares, dense_policies
from tests.fixtures import make_tiny_llama
from tests.routing.conftest import calibrated_copy


def adapted_copy(seed=0, rank=4):
    """A calibrated tiny routed model whose adapters hold random (trained-looking) weights."""
    model, mods = calibrated_copy(seed)
    g = torch.Generator().manual_seed(seed + 100)
    for m in mods:
        a = m.add_adapter(rank, g)
        with torch.no_grad():
            for p in a.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, mods


def test_dense_path_of_an_adapted_model_is_the_original_bit_for_bit(tiny_ids):
    ref = make_tiny_llama(0)
    model, mods = adapted_copy(0)
    with torch.no_grad():
        expected = ref(tiny_ids).logits
        with dense_policies(mods):
            assert torch.equal(model(tiny_ids).logits, expected)
            stats = RoutingStats()
            with collecting(model, stats):  # the masked reference path at the dense policy
                assert torch.equal(model(tiny_ids).logits, expected)


def test_adapter_changes_only_the_routed_path(tiny_ids):
    model, mods = adapted_copy(0)
    with torch.no_grad():
        adapted = model(tiny_ids).logits
        saved = [m.adapter for m in mods]
        for m in mods:
            m.adapter = None
        plain = model(tiny_ids).logits
        for m, a in zip(mods, saved, strict=True):
            m.adapter = a
    assert not torch.allclose(adapted, plain)


def test_a_fresh_adapter_is_a_no_op(tiny_ids):
    model, mods = calibrated_copy(0)
    with torch.no_grad():
        before = model(tiny_ids).logits
        for m in mods:
            m.add_adapter(4, torch.Generator().manual_seed(0))
        assert torch.equal(model(tiny_ids).logits, before)
    assert mods[0].adapter.w_in.abs().sum() > 0  # the input sides are random, so every factor trains


def test_routed_mlp_applies_the_kernel_contract():
    """RoutedMLP's masked path == reference.routed_ffn with the same adapter (the fast kernels' target)."""
    _, mods = adapted_copy(1)
    m = mods[0]
    x = torch.randn(7, m.hidden, generator=torch.Generator().manual_seed(3))
    r = m.router
    with torch.no_grad():
        y, counts = reference.routed_ffn(x, m.w_gate, m.w_up, m.w_down_t, r.shadow_q, r.shadow_scale, r.unit_bias,
                                         m.threshold, m.min_units, m.max_units, adapter=m.adapter.tensors())
        torch.testing.assert_close(m(x), y)
        # by hand: low-rank terms on gate/up, down correction from the selected units only
        a = m.adapter
        mask = m.select(r.score(x))
        g = x @ m.w_gate.t() + (x @ a.w_in[: a.rank].t()) @ a.w_units[:, 0].t()
        u = x @ m.w_up.t() + (x @ a.w_in[a.rank:].t()) @ a.w_units[:, 1].t()
        h = torch.nn.functional.silu(g) * u * mask
        torch.testing.assert_close(y, h @ m.w_down_t + (h @ a.w_units[:, 2]) @ a.w_out.t())
    assert torch.equal(counts, mask.sum(-1))


def test_adapter_bytes_are_counted_in_the_cost():
    model, mods = adapted_copy(0, rank=4)
    m = mods[0]
    with_adapter = cost_shares(model, mods, {x.layer_idx: 0.5 for x in mods})
    # 3 r H fixed + d * 3 F r per token and layer
    dense = sum(3 * x.units * x.hidden * 4 for x in mods)
    expected = len(mods) * 4 * (3 * 4 * m.hidden + 0.5 * 3 * m.units * 4) / dense
    assert abs(with_adapter["adapter_bytes_share"] - expected) < 1e-12
    m.set_policy(LayerPolicy.dense(m.units))
    dense_layer = cost_shares(model, mods[:1], {m.layer_idx: 1.0})
    assert dense_layer["adapter_bytes_share"] == 0.0  # a dense layer reads no adapter
