"""Pieces shared by the commands: argument types, early checks, tables, JSON output, threads.

Nothing here imports torch at module level: argument errors must answer before it loads.
"""

from __future__ import annotations

import math
import os

from adaroute.errors import AdarouteError
from adaroute.fsio import check_output_file, write_json_atomic
from adaroute.table import format_table

__all__ = ["format_table"]  # re-exported: commands print tables through here

MAX_SEED = 2**63 - 1


def add_model_arg(parser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="Hugging Face model directory, .gguf file, routed model directory, or smollm2-135m")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its error message


def head_rows(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


head_rows.__name__ = "row count (0 or more)"


def add_head_rows_arg(parser, converting: bool = False) -> None:
    """``--head-rows``: the routed output head (``adaroute.runtime.head``), float32 models only."""
    from adaroute.config import RoutingConfig

    what = ("routed output head: exact logits for N vocabulary rows per token, the rest from the head's "
            "8-bit shadow (f32 only; 0 = the exact head)")
    parser.add_argument("--head-rows", type=head_rows, default=None, metavar="N",
                        help=what + (f" (default {RoutingConfig.head_rows} at f32)" if converting
                                     else "; overrides the routed directory's"))


def apply_head_rows(model, info, rows: int | None, fmt: str) -> None:
    """Sets a loaded routed model's routed head from ``--head-rows`` (None: as its directory says);
    with ``model`` None, only checks the option (before a slow load)."""
    if rows is None:
        return
    if not info.routed:
        raise AdarouteError("--head-rows applies to routed models only: convert the model first (adaroute convert)")
    if rows and fmt != "f32":
        raise AdarouteError(f"--head-rows: the routed head runs on a float32 head; this model runs at {fmt} "
                            "(leave --head-rows out, or use a model converted at --weights f32)")
    if model is not None:
        model.adaroute_head_rows = rows


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


finite_float.__name__ = "finite number"


def density(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise ValueError(text)
    return value


density.__name__ = "density in (0, 1]"


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(text)
    return value


seed.__name__ = "seed (0 to 2**63-1)"


def setup_threads() -> None:
    """Use every core for intra-op work (torch picks fewer on some machines); ADAROUTE_THREADS overrides."""
    import torch

    torch.set_num_threads(thread_count())


def thread_count() -> int:
    text = os.environ.get("ADAROUTE_THREADS")
    if text is None:
        return os.cpu_count() or 1
    try:
        return positive_int(text)
    except ValueError:
        raise AdarouteError(f"ADAROUTE_THREADS={text!r} is not a positive whole number: unset it or set e.g. 2") \
            from None


def check_json_arg(path: str | None) -> None:
    """Fail on an unwritable --json path before any work (the file is written at the end)."""
    if path:
        check_output_file(path)


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` whole (temporary sibling, then rename), if a path was given."""
    if path:
        write_json_atomic(path, payload)
