"""Weight formats: the one place that names them and builds a loaded model's runtime weights at one.

    fmt = parse_format("q4")                    # "q4_1"; AdarouteError for a name it does not know
    weights = runtime_weights(model, fmt)       # from_model, then quant_weights.quantise unless f32
    engine = Engine(weights)

Names users may give (``--weights`` of convert, eval and bench): ``f32``; ``q8`` = ``q8_0``; ``q4`` =
``q4_1``; ``q4_0``. The canonical names (``FORMATS``) are GGUF's block formats. A routed model directory
records the format it was converted for in config.json (``"adaroute": {"weights": "q4_1"}``); the file
itself always holds float32 weights, and the blocks are made from them when the model is loaded to run
(``quantise``: ggml's rounding; routed layers take the exact router, routing adapters stay float32 and
apply to the selected units). A directory without the field runs at f32.

Nothing here imports torch at module level (``runtime_weights`` imports the runtime when called).
"""

from __future__ import annotations

from typing import Any

from adaroute.errors import AdarouteError

F32 = "f32"
FORMATS = (F32, "q8_0", "q4_0", "q4_1")  # canonical names, as recorded in config.json
ALIASES = {"f32": F32, "q8": "q8_0", "q8_0": "q8_0", "q4": "q4_1", "q4_1": "q4_1", "q4_0": "q4_0"}
CHOICES = "f32, q8 (= q8_0), q4 (= q4_1) or q4_0"


def parse_format(name: str | None, option: str = "--weights") -> str:
    """The canonical format for a user's name (None: f32); a one-line AdarouteError otherwise."""
    if name is None:
        return F32
    fmt = ALIASES.get(str(name).strip().lower())
    if fmt is None:
        raise AdarouteError(f"{option} {name!r} is not a weight format: choose {CHOICES}")
    return fmt


def recorded_format(meta: dict[str, Any] | None) -> str:
    """The format a routed directory's ``adaroute`` block records (f32 when it records none, e.g. a
    directory written before formats were recorded, or ``meta`` None for a plain model)."""
    if not meta:
        return F32
    value = meta.get("weights", F32)
    if value not in FORMATS:
        raise ValueError(f"weights {value!r} is not one of {', '.join(FORMATS)}")
    return value


def model_format(info, requested: str | None = None) -> str:
    """The format to run a model inspected with ``adaroute.models.inspect_model`` at: ``requested``
    (a user's name) or, when None, a routed directory's recorded format (f32 for Hugging Face
    directories and GGUF files)."""
    meta = None
    if info.routed:
        from adaroute.routing.storage import read_meta

        meta = read_meta(info.source.directory)
    return parse_format(requested) if requested is not None else recorded_format(meta)


def runtime_weights(model, fmt: str | None, max_positions: int | None = None):
    """The runtime's ``ModelWeights`` of a loaded model at ``fmt`` (any name ``parse_format`` takes;
    None = f32): ``from_model`` (views of the model's float32 tensors), then ``quantise`` for q8/q4.

    Routed layers read the thresholds of their modules' current density when the engine runs."""
    from adaroute.runtime.weights import from_model

    fmt = parse_format(fmt)
    weights = from_model(model, max_positions)
    if fmt == F32:
        return weights
    from adaroute.runtime.quant_weights import quantise

    _check_blocks(weights, fmt)
    return quantise(weights, fmt)


def _check_blocks(weights, fmt: str) -> None:
    """Every quantised matrix is cut into blocks of 32 along its rows: a row length that is not a
    multiple of 32 is a one-line error rather than a failure inside the quantiser."""
    from adaroute.kernels.quant_reference import BLOCK

    widths = {"hidden size": weights.hidden}
    for ly in weights.layers:
        widths["attention output width"] = ly.wo.shape[1]
        widths["FFN width"] = ly.ffn.w_gate.shape[0]
    bad = [f"{name} {n}" for name, n in widths.items() if n % BLOCK]
    if bad:
        raise AdarouteError(f"{fmt} cuts rows into blocks of {BLOCK} values, and this model's {', '.join(bad)} "
                            f"is not a multiple of {BLOCK}: run it with --weights f32")
