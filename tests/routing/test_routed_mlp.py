import torch

from adaroute.routing import LayerPolicy, RoutedMLP, RoutingStats, collecting, route_model, unroute_model
from tests.fixtures import make_tiny_llama
from tests.routing.conftest import calibrated_copy


def test_density_one_gives_the_dense_logits_exactly(tiny_ids):
    model = make_tiny_llama(0)
    with torch.no_grad():
        ref = model(tiny_ids).logits
        route_model(model)
        assert torch.equal(model(tiny_ids).logits, ref)
        # also through the masked reference path (a collector forces it)
        stats = RoutingStats()
        with collecting(model, stats):
            assert torch.equal(model(tiny_ids).logits, ref)
    assert stats.mean_density() == 1.0


def test_routed_forward_masks_exactly_the_selected_units():
    model, mods = calibrated_copy()
    m = mods[0]
    x = torch.randn(3, 5, m.hidden)
    with torch.no_grad():
        mask = m.select(m.router.score(x.reshape(-1, m.hidden)))
        h = torch.nn.functional.silu(x.reshape(-1, m.hidden) @ m.w_gate.t()) * (x.reshape(-1, m.hidden) @ m.w_up.t())
        expected = (h * mask) @ m.w_down_t
        torch.testing.assert_close(m(x), expected.reshape(3, 5, m.hidden))


def test_units_per_token_vary(tiny_ids):
    model, _ = calibrated_copy()
    stats = RoutingStats()
    with torch.no_grad(), collecting(model, stats):
        model(tiny_ids)
    dist = stats.units_per_token()
    assert dist["std"] > 0 and dist["max"] > dist["min"]


def test_surgery_undo_restores_the_original_module(tiny_ids):
    model = make_tiny_llama(1)
    originals = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        ref = model(tiny_ids).logits
    mods = route_model(model)
    assert all(isinstance(layer.mlp, RoutedMLP) for layer in model.model.layers)
    for m in mods:
        m.set_policy(LayerPolicy.topk(8))
    assert unroute_model(model) == 2
    assert [layer.mlp for layer in model.model.layers] == originals
    with torch.no_grad():
        assert torch.equal(model(tiny_ids).logits, ref)


def test_routing_twice_or_undoing_nothing_is_an_error():
    import pytest

    model = make_tiny_llama(0)
    with pytest.raises(ValueError, match="no routed modules"):
        unroute_model(model)
    route_model(model)
    with pytest.raises(ValueError, match="already routed"):
        route_model(model)


def test_router_parameters_are_the_trainable_subset():
    model, mods = calibrated_copy()
    names = {id(p) for p in mods[0].router_parameters()}
    assert names == {id(mods[0].router.shadow_scale), id(mods[0].router.unit_bias)}
    assert not mods[0].w_gate.requires_grad
