import json

import pytest
import torch

from adaroute.config import RoutingConfig
from adaroute.routing import RoutedFormatError, load_routed, routed_modules, save_routed
from adaroute.routing.profile import PROFILE_GRID, LayerProfile
from tests.fixtures import make_tiny_tokenizer
from tests.routing.conftest import calibrated_copy


@pytest.fixture
def saved(tmp_path):
    model, mods = calibrated_copy(seed=3)
    for m in mods:  # a profile, so density overrides survive the round trip
        grid = list(PROFILE_GRID)
        m.profile = LayerProfile(grid, [-float(i) for i in range(19)] + [float("-inf")], [1.0] * 20, 0.5,
                                 "adaptive", m.min_units, m.max_units)
    save_routed(model, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig(), {"data": ["x"]})
    return model, tmp_path


def test_save_load_round_trips_exactly(saved, tiny_ids):
    model, path = saved
    loaded, tok = load_routed(path)
    ref_state, new_state = model.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    for a, b in zip(routed_modules(model), routed_modules(loaded), strict=True):
        assert a.policy == b.policy and a.profile == b.profile
    with torch.no_grad():
        assert torch.equal(model(tiny_ids).logits, loaded(tiny_ids).logits)
    assert tok("if x:")["input_ids"] == make_tiny_tokenizer()("if x:")["input_ids"]
    assert json.loads((path / "calibration.json").read_text())["data"] == ["x"]


def test_runtime_layout_names_are_in_the_checkpoint(saved):
    from safetensors import safe_open

    _, path = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.router.shadow_q").dtype == torch.uint8
    for name in ("w_units", "router.shadow_q", "router.shadow_scale", "router.unit_bias"):
        assert f"model.layers.1.mlp.{name}" in keys


def test_wrong_format_version_is_a_clear_error(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["adaroute"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        load_routed(path)


def test_shape_mismatch_is_a_clear_error(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.mlp.router.unit_bias"] = torch.zeros(5)
    del state["model.layers.1.mlp.w_units"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(RoutedFormatError, match=r"missing .*w_units.*shape .*unit_bias"):
        load_routed(path)
