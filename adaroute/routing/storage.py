"""Routed model directory: write it, and read it back with key, shape and version checks.

Layout:
    config.json        {"adaroute": {format_version, base_model, base_config, routing, router, layers, weights}}
                       (weights: the format it runs at, adaroute.runtime.formats; absent in older
                       directories, which run at f32)
    model.safetensors  every weight of the model as the routed runtime holds it: base weights with each
                       FFN unit-packed (w_units [F, 3, H]: gate row, up row, down column) plus router weights;
                       at q8/q4 (version 3) every matrix the runtime quantises is stored as GGUF blocks
                       and the router is the exact one (adaroute.runtime.checkpoint: layout and index)
    tokenizer files    whatever the tokenizer's save_pretrained writes
    calibration.json   what calibrated it (data, seed, per-layer density, usage statistics)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaroute.config import FORMAT_VERSION, RoutingConfig
from adaroute.fsio import atomic_dir
from adaroute.routing.adapter import RoutingAdapter
from adaroute.routing.policy import LayerPolicy, UnitPolicy
from adaroute.routing.profile import LayerProfile
from adaroute.routing.router import ExactRouter
from adaroute.routing.surgery import route_model, routed_modules
from adaroute.routing.validation import (
    CALIBRATION,
    CONFIG,
    WEIGHTS,
    RoutedFormatError,
    check_meta,
    check_safetensors,
    check_tokenizer,
    fail,
    read_json_object,
)
from adaroute.runtime.formats import F32, parse_format, recorded_format

# Version 2 added routing adapters (``adapter_rank`` per layer, adapter tensors in the weights); a
# version-1 directory is the same without them and loads as a model without adapters.
# Version 3 stores q8/q4 models as blocks (the ``weights`` key names the format; float32 directories
# are unchanged from version 2, whose directories with "weights": "q8_0"/"q4_1" hold float32 weights
# and are quantised when loaded to run); a directory without the key runs at f32.
READABLE_VERSIONS = (1, 2, FORMAT_VERSION)


def save_routed(
    model: nn.Module,
    tokenizer,
    directory: str | Path,
    base_model: str,
    routing: RoutingConfig,
    calibration: dict[str, Any] | None = None,
    replace: bool = False,
    weights: str = "f32",
) -> Path:
    """Write a self-contained routed model directory; returns its path.

    The directory is written beside its final path and renamed into place when complete, so an
    interrupted save never leaves a half-written model; ``replace`` swaps out an existing one whole.
    ``weights``: the format the model runs at (``adaroute.runtime.formats``), recorded in config.json;
    at q8/q4 the matrices are written as that format's blocks and the routers become exact ones
    (``adaroute.runtime.checkpoint``); ``model`` itself is left as it is.
    """
    weights = parse_format(weights)
    mods = routed_modules(model)
    if any(isinstance(m.router, ExactRouter) for m in mods):
        raise ValueError("model: it was loaded from a directory stored as blocks; copy that directory instead "
                         "of saving it again (its blocks would be rounded twice)")
    header = {"format_version": str(FORMAT_VERSION)}
    if weights == F32:
        tensors = unique_state(model)
        router = {"kind": "int4_shadow", "bits": 4, "group_size": mods[0].router.group_size}
    else:
        from adaroute.runtime.checkpoint import BLOCKS_KEY, block_state

        tensors, index = block_state(model, weights)
        header[BLOCKS_KEY] = json.dumps(index)
        router = {"kind": "exact", "group_size": mods[0].router.group_size}
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "base_config": model.config.to_dict(),
        "routing": routing.to_dict(),
        "router": router,
        "layers": [_layer_entry(m) for m in mods],
        "weights": weights,
    }
    with atomic_dir(directory, replace=replace) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=header)
        (tmp / CONFIG).write_text(json.dumps({"adaroute": meta}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if calibration is not None:
            (tmp / CALIBRATION).write_text(json.dumps(calibration, indent=2) + "\n")
    return Path(directory)


def load_routed(directory: str | Path) -> tuple[nn.Module, object]:
    """Read a directory written by ``save_routed`` -> (routed model in eval mode, tokenizer)."""
    path = Path(directory)
    meta = read_meta(path)
    check_safetensors(path / WEIGHTS)
    check_tokenizer(path)
    try:
        model = build_routed(meta)
    except Exception as e:  # transformers' config classes reject bad values with several exception types
        raise fail(path / CONFIG, f"base_config does not describe a model ({_first_line(e)})") from e
    if load_weights(model, path / WEIGHTS):  # stored as blocks: the runtime reads them from the file
        if recorded_format(meta) == F32:
            raise fail(path / CONFIG, "weights says f32 but model.safetensors holds blocks: restore config.json")
        model.adaroute_blocks = (path, recorded_format(meta))
    return model.eval(), load_tokenizer(path)


def load_tokenizer(path: Path):
    """The directory's tokenizer (checked by ``check_tokenizer`` first), or a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # tokenizers raise many types on damaged files; all mean "unreadable"
        raise fail(path, f"the tokenizer files cannot be read ({_first_line(e)})") from e


def read_meta(path: Path) -> dict[str, Any]:
    """The checked ``adaroute`` block of ``path``/config.json."""
    config = read_json_object(path / CONFIG)
    if "adaroute" not in config:
        raise fail(path / CONFIG, 'has no "adaroute" block, so it is not a routed model')
    return check_meta(config["adaroute"], path / CONFIG, READABLE_VERSIONS)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def build_routed(meta: dict[str, Any]) -> nn.Module:
    """An un-loaded routed model with the structure and policies described by ``meta``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(meta["base_config"])
    config = AutoConfig.for_model(base.pop("model_type"), **base)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = [e["layer"] for e in meta["layers"]]
    mods = route_model(model, group_size=int(meta["router"]["group_size"]), layers=layers)
    model.adaroute_head_rows = head_rows(meta)
    exact = meta["router"].get("kind") == "exact"
    for m, entry in zip(mods, meta["layers"], strict=True):
        object.__setattr__(m, "original", None)  # a loaded model has no dense original to restore
        held = layer_policy(entry, m.units)
        m.set_policy(held.policy)
        m.profile = held.profile
        if entry.get("adapter_rank", 0):  # weights arrive with load_weights
            m.adapter = RoutingAdapter(m.hidden, m.units, int(entry["adapter_rank"]))
        if exact:
            m.router = ExactRouter(m, m.router.unit_bias)
    return model


def head_rows(meta: dict[str, Any]) -> int:
    """Exact rows per token of the routed output head a directory asks for (0: the exact head;
    directories written before the routed head have none)."""
    return int(meta.get("routing", {}).get("head_rows", 0))


def layer_policy(entry: dict[str, Any], units: int) -> UnitPolicy:
    """A (checked) ``layers`` entry of config.json as a policy holder."""
    policy = LayerPolicy(_float(entry["threshold"]), int(entry["min_units"]), int(entry["max_units"]))
    profile = LayerProfile.from_dict(entry["profile"]) if entry.get("profile") else None
    return UnitPolicy(int(entry["layer"]), units, policy, profile)


def load_weights(model: nn.Module, file: Path) -> bool:
    """Load ``file`` into ``model`` after checking that keys and shapes match exactly (blocks are
    dequantised); returns whether the file held blocks."""
    from adaroute.runtime.checkpoint import BLOCKS_KEY, float_state

    expected = {k: tuple(v.shape) for k, v in unique_state(model).items()}
    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            index = json.loads((f.metadata() or {}).get(BLOCKS_KEY, "{}"))
        if index:
            state = float_state(state, index)
        problems = _mismatches(expected, {k: tuple(v.shape) for k, v in state.items()})
        if problems:
            raise fail(file, f"weights do not match the config: {problems}")
    except RoutedFormatError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        raise fail(file, f"cannot be read ({_first_line(e)})") from e
    missing, _ = model.load_state_dict(state, strict=False)
    untied = [k for k in missing if k not in _aliases(model)]
    if untied:
        raise fail(file, f"weights do not match the config: missing {untied[:5]}")
    return bool(index)


def _mismatches(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [f"{k} {found[k]} != {expected[k]}" for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
    if extra:
        parts.append(f"unexpected {extra[:5]}" + (f" (+{len(extra) - 5})" if len(extra) > 5 else ""))
    if shapes:
        parts.append("shape " + "; ".join(shapes[:5]))
    return ", ".join(parts)


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().contiguous()
    return out


def _aliases(model: nn.Module) -> set[str]:
    return set(model.state_dict()) - set(unique_state(model))


def _layer_entry(m) -> dict[str, Any]:
    return {
        "layer": m.layer_idx,
        "threshold": _json_float(m.threshold),
        "min_units": m.min_units,
        "max_units": m.max_units,
        "profile": m.profile.to_dict() if m.profile is not None else None,
        "adapter_rank": m.adapter.rank if m.adapter is not None else 0,
    }


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _float(x: float | str) -> float:
    return float(x)
