"""Perplexity ratio per file when the first layers get more of the same mean density.

    python benchmarks/early_layers.py DIR --data readmes.txt builtin:heldout licences.txt \
        [--shifts 0:0 6:0.1 6:0.15 6:0.2 4:0.2] [--max-tokens 4096] [--json out/early_layers.json]

DIR: a routed model directory with calibration profiles. A shift ``K:D`` adds D to the converted
density of layers 0..K-1 (at most 1) and takes the same total evenly from the other layers, so the
mean density stays the converted one; thresholds come from each layer's profile
(``LayerProfile.threshold_at``) and every file is then scored by ``compare_with_dense`` (the
reference path, as ``adaroute eval`` scores a float32 model). ``0:0`` is the model as converted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adaroute.cli.common import format_table, setup_threads
from adaroute.data import load_texts
from adaroute.fsio import write_json_atomic
from adaroute.models import load_model
from adaroute.routing import routed_modules
from adaroute.routing.profile import policy_for
from adaroute.routing.quality import compare_with_dense


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("routed", help="routed model directory")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--shifts", nargs="+", default=["0:0", "6:0.1", "6:0.15", "6:0.2", "4:0.2"])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--no-start", action="store_true",
                   help="score windows without the start token (adaroute eval --no-start)")
    p.add_argument("--json", default="out/early_layers.json")
    return p.parse_args(argv)


def shifted(base: list[float], first: int, extra: float) -> list[float]:
    """``base`` densities with ``extra`` added to the first ``first`` layers (capped at 1) and the
    added total taken evenly from the others: the mean is unchanged."""
    out = [min(1.0, d + extra) if i < first else d for i, d in enumerate(base)]
    rest = len(base) - first
    added = sum(out) - sum(base)
    return [d if i < first else d - added / rest for i, d in enumerate(out)] if rest else out


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_threads()
    model, tok = load_model(args.routed)
    mods = routed_modules(model)
    if not mods or any(m.profile is None for m in mods):
        raise SystemExit(f"{args.routed}: needs a routed model directory with calibration profiles")
    texts = load_texts(args.data)
    base = [m.profile.density for m in mods]
    records, rows = [], []
    for spec in args.shifts:
        first, extra = spec.split(":")
        dens = shifted(base, int(first), float(extra))
        for m, d in zip(mods, dens, strict=True):
            m.set_policy(policy_for(m, m.profile, d))
        ratios = {t.name: compare_with_dense(model, tok, t.text, args.window, args.max_tokens, cost=False,
                                             start=not args.no_start)["perplexity_ratio"] for t in texts}
        records.append({"first_layers": int(first), "extra": float(extra), "densities": dens, "ratios": ratios})
        rows.append([first, extra, f"{sum(dens) / len(dens):.3f}", *(f"{r:.4f}" for r in ratios.values())])
        print(format_table(["first", "extra", "mean density", *ratios], rows[-1:]), flush=True)
    for m, d in zip(mods, base, strict=True):
        m.set_policy(policy_for(m, m.profile, d))
    print()
    print(format_table(["first", "extra", "mean density", *(t.name for t in texts)], rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, {"model": args.routed, "records": records})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
