"""Weight formats: the one place that names them and builds a loaded model's runtime weights at one.

    fmt = parse_format("q4")                    # "q4_1"; AdarouteError for a name it does not know
    weights = runtime_weights(model, fmt)       # from_model, then quant_weights.quantise unless f32
    engine = Engine(weights)

Names users may give (``--weights`` of convert, eval and bench): ``f32``; ``q8`` = ``q8_0``; ``q4`` =
``q4_1``; ``q4_0``. The canonical names (``FORMATS``) are GGUF's block formats. A routed model directory
records the format it was converted for in config.json (``"adaroute": {"weights": "q4_1"}``) and, from
format version 3, stores the blocks themselves (``adaroute.runtime.checkpoint``: ggml's rounding, made
once at conversion; routed layers take the exact router, routing adapters are held in float16 and
apply to the selected units); such a model runs only at its format. A version-2 directory recording q8/q4
holds float32 weights, quantised when loaded to run. A directory without the field runs at f32.

Nothing here imports torch at module level (``runtime_weights`` imports the runtime when called).
"""

from __future__ import annotations

import dataclasses
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


def stored_blocks(meta: dict[str, Any] | None) -> str | None:
    """The block format a routed directory's file holds (None: float32). From format version 3 a
    directory recorded at q8/q4 stores that format's blocks; older ones store float32 at any format."""
    fmt = recorded_format(meta)
    return fmt if fmt != F32 and meta.get("format_version", 0) >= 3 else None


def model_format(info, requested: str | None = None) -> str:
    """The format to run a model inspected with ``adaroute.models.inspect_model`` at: ``requested``
    (a user's name) or, when None, a routed directory's recorded format (f32 for Hugging Face
    directories and GGUF files). A directory stored as blocks runs only at their format."""
    meta = None
    if info.routed:
        from adaroute.routing.storage import read_meta

        meta = read_meta(info.source.directory)
    if requested is None:
        return recorded_format(meta)
    fmt, stored = parse_format(requested), stored_blocks(meta)
    if stored is not None and fmt != stored:
        raise _only_at(info.source.directory, stored, fmt)
    return fmt


def _only_at(directory, stored: str, fmt: str) -> AdarouteError:
    return AdarouteError(f"{directory} stores its weights as {stored} blocks and runs only at that format (asked "
                         f"for {fmt}): leave --weights out, or convert the model again with --weights {fmt}")


def runtime_weights(model, fmt: str | None, max_positions: int | None = None):
    """The runtime's ``ModelWeights`` of a loaded model at ``fmt`` (any name ``parse_format`` takes;
    None = the format the model is stored in: f32 unless it came from a directory of blocks).

    A model loaded from a directory stored as blocks runs on those blocks, read from its file
    (``adaroute.runtime.checkpoint.load_weights``; its modules hold the routed policies), and only at
    their format: anything else would round them twice. Otherwise ``from_model`` (views of the
    model's float32 tensors), then ``quantise`` for q8/q4; at f32 the routers' shadows are held in
    the compiled step's scoring layout where it runs (``fused_cpu.scoring_layout``). Routed layers
    read the thresholds of their modules' current density when the engine runs."""
    blocks = getattr(model, "adaroute_blocks", None)  # (directory, format), set by load_routed
    if blocks is not None:
        directory, stored = blocks
        if fmt is not None and parse_format(fmt) != stored:
            raise _only_at(directory, stored, parse_format(fmt))
        from adaroute.routing.surgery import routed_modules
        from adaroute.runtime.checkpoint import load_weights

        return load_weights(directory, max_positions, routed_modules(model))
    from adaroute.runtime.weights import from_model

    fmt = parse_format(fmt)
    weights = from_model(model, max_positions)
    if fmt == F32:
        from adaroute.runtime.fused_cpu import scoring_layout
        from adaroute.runtime.head import routed_head

        rows = getattr(model, "adaroute_head_rows", 0)
        weights = dataclasses.replace(weights, routed_head=routed_head(weights.head, rows)) if rows else weights
        return scoring_layout(weights)
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
