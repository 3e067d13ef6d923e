"""Checks of a routed model directory before anything is built from it.

A damaged directory (edited by hand, truncated by a full disk, half-copied) must fail with one line
that names the file and says what to do, never with a KeyError or a parser's own error deep inside
the load. The checks here cover config.json (JSON object, keys, types, ranges), the presence and
integrity of model.safetensors (its header, and that the file holds every byte the header
promises) and the tokenizer files. Keys and shapes of the tensors themselves are checked against
the model the config describes while loading (``storage.load_weights``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from adaroute.config import RoutingConfig
from adaroute.errors import AdarouteError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CALIBRATION = "calibration.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
FIX = "convert the model again (adaroute convert) or restore the directory from a copy"


class RoutedFormatError(AdarouteError, ValueError):
    """A routed directory that this version cannot read (shown to users as one line)."""


def fail(file: Path, problem: str) -> RoutedFormatError:
    return RoutedFormatError(f"{file}: {problem}; {FIX}")


def read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``, or a one-line error naming the file."""
    try:
        data = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise fail(file, "missing") from None
    except OSError as e:
        raise fail(file, f"cannot be read ({e.strerror})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(file, f"is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise fail(file, f"holds a JSON {type(data).__name__}, not an object")
    return data


def check_meta(meta: Any, file: Path, readable_versions: tuple[int, ...]) -> dict[str, Any]:
    """The ``adaroute`` block of config.json, with every key this version reads checked."""
    if not isinstance(meta, dict):
        raise fail(file, f'"adaroute" is a {type(meta).__name__}, not an object')
    version = meta.get("format_version")
    if version not in readable_versions:
        raise RoutedFormatError(f"{file}: routed format {version!r}, this adaroute reads "
                                f"{', '.join(map(str, readable_versions))}; convert the model again (adaroute convert)")
    _need(meta, file, {"base_model": str, "base_config": dict, "routing": dict, "router": dict, "layers": list})
    base = meta["base_config"]
    _need(base, file, {"model_type": str, "num_hidden_layers": int, "intermediate_size": int}, "base_config.")
    try:
        RoutingConfig.from_dict(meta["routing"])
    except (TypeError, ValueError) as e:
        raise fail(file, f"routing: {e}") from e
    _need(meta["router"], file, {"group_size": int}, "router.")
    if meta["router"]["group_size"] <= 0:
        raise fail(file, "router.group_size must be positive")
    _check_layers(meta["layers"], file, base["num_hidden_layers"], base["intermediate_size"])
    from adaroute.runtime.formats import recorded_format

    try:
        recorded_format(meta)  # the weight format the model was converted for (absent: f32)
    except ValueError as e:
        raise fail(file, str(e)) from e
    return meta


def _check_layers(layers: list, file: Path, n_layers: int, units: int) -> None:
    if not layers:
        raise fail(file, "layers is empty")
    seen: set[int] = set()
    for i, entry in enumerate(layers):
        where = f"layers[{i}]."
        if not isinstance(entry, dict):
            raise fail(file, f"layers[{i}] is not an object")
        _need(entry, file, {"layer": int, "threshold": (int, float, str), "min_units": int, "max_units": int}, where)
        if not 0 <= entry["layer"] < n_layers or entry["layer"] in seen:
            raise fail(file, f"{where}layer {entry['layer']} is out of range or repeated (model has {n_layers})")
        seen.add(entry["layer"])
        if not 0 <= entry["min_units"] <= entry["max_units"] <= units:
            raise fail(file, f"{where}min_units/max_units must satisfy 0 <= min <= max <= {units}")
        if _as_float(entry["threshold"]) is None:
            raise fail(file, f"{where}threshold {entry['threshold']!r} is not a number")
        if entry.get("profile") is not None and not isinstance(entry["profile"], dict):
            raise fail(file, f"{where}profile is not an object")
        rank = entry.get("adapter_rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise fail(file, f"{where}adapter_rank must be a non-negative integer, got {rank!r}")


def _need(obj: dict, file: Path, spec: dict[str, type | tuple], prefix: str = "") -> None:
    for key, kind in spec.items():
        if key not in obj:
            raise fail(file, f"key {prefix}{key} is missing")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise fail(file, f"{prefix}{key} is a {type(value).__name__}, expected {names}")


def _as_float(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def check_safetensors(file: Path) -> dict:
    """The file exists and holds a well-formed header whose tensors all fit inside the file; returns
    the header (JSON object: tensor entries and ``__metadata__``) and where the data block starts as
    ``__data_start__``.

    safetensors' own reader reports truncation as an opaque error (or, memory-mapping, only when
    a tensor is touched), so the header is read here with the format's documented layout:
    8-byte little-endian header length, a JSON header, then the data block the offsets index.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except FileNotFoundError:
        raise fail(file, "missing") from None
    except OSError as e:
        raise fail(file, f"cannot be read ({e.strerror})") from e
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise fail(file, "is not a safetensors file (empty, truncated or overwritten)")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not ends or max(ends) > size - 8 - n:
        raise fail(file, f"is truncated ({size} bytes, its header promises {8 + n + max(ends, default=0)})")
    return {**header, "__data_start__": 8 + n}


def check_tokenizer(directory: Path) -> None:
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise fail(directory, f"no tokenizer files ({', '.join(TOKENIZER_FILES)})")

