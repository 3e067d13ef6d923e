"""Pieces shared by the commands: arguments, tables, JSON output, threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from adaroute.errors import AdarouteError


def add_model_arg(parser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="Hugging Face model directory, .gguf file, routed model directory, or smollm2-135m")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its error message


def setup_threads() -> None:
    """Use every core for intra-op work (torch picks fewer on some machines)."""
    torch.set_num_threads(int(os.environ.get("ADAROUTE_THREADS", os.cpu_count() or 1)))


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    out = Path(path)
    if out.is_dir():
        raise AdarouteError(f"--json {path} is a directory: give a file name such as {out / 'result.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as e:
        raise AdarouteError(f"cannot write {path}: {e.strerror}; choose a writable location") from e


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain left/right aligned text table (numbers right-aligned)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
