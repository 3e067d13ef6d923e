import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaroute.config import FORMAT_VERSION, RoutingConfig
from adaroute.routing import RoutedFormatError, load_routed, routed_modules, save_routed
from adaroute.routing.quality import dense_policies
from tests.fixtures import make_tiny_llama, make_tiny_tokenizer
from tests.routing.conftest import calibrated_copy
from tests.routing.test_adapter import adapted_copy


def test_adapters_round_trip_and_the_version_is_bumped(tmp_path, tiny_ids):
    model, _ = adapted_copy(2)
    save_routed(model, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig())
    meta = json.loads((tmp_path / "config.json").read_text())["adaroute"]
    assert meta["format_version"] == FORMAT_VERSION >= 2
    assert [e["adapter_rank"] for e in meta["layers"]] == [4, 4]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert {"model.layers.0.mlp.adapter.w_in", "model.layers.0.mlp.adapter.w_units",
                "model.layers.0.mlp.adapter.w_out"} <= set(f.keys())
    loaded, _ = load_routed(tmp_path)
    for a, b in zip(routed_modules(model), routed_modules(loaded), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.adapter.tensors(), b.adapter.tensors(), strict=True))
    with torch.no_grad():
        assert torch.equal(model(tiny_ids).logits, loaded(tiny_ids).logits)
        with dense_policies(routed_modules(loaded)):  # a loaded adapted model's dense path is the original
            assert torch.equal(loaded(tiny_ids).logits, make_tiny_llama(2)(tiny_ids).logits)


def write_version_1(model, path):
    """A routed directory exactly as format 1 wrote it: no adapter_rank, no adapter tensors."""
    save_routed(model, make_tiny_tokenizer(), path, "tiny", RoutingConfig())
    cfg = json.loads((path / "config.json").read_text())
    cfg["adaroute"]["format_version"] = 1
    for entry in cfg["adaroute"]["layers"]:
        del entry["adapter_rank"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(path / "model.safetensors"), metadata={"format_version": "1"})


def test_a_version_1_directory_loads_unchanged(tmp_path, tiny_ids):
    model, _ = calibrated_copy(seed=3)
    write_version_1(model, tmp_path)
    loaded, _ = load_routed(tmp_path)
    assert all(m.adapter is None for m in routed_modules(loaded))
    with torch.no_grad():
        assert torch.equal(model(tiny_ids).logits, loaded(tiny_ids).logits)


def test_a_bad_adapter_rank_is_a_one_line_error(tmp_path):
    model, _ = adapted_copy(0)
    save_routed(model, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["adaroute"]["layers"][0]["adapter_rank"] = -1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RoutedFormatError, match="adapter_rank must be a non-negative integer") as err:
        load_routed(tmp_path)
    assert "\n" not in str(err.value)
    cfg["adaroute"]["layers"][0]["adapter_rank"] = 8  # the tensors say 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RoutedFormatError, match="adapter"):
        load_routed(tmp_path)
