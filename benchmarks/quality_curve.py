"""Perplexity ratio (routed / dense) against mean FFN density, learned router beside the hindsight oracle.

    python benchmarks/quality_curve.py --preset quick --json out/quality_curve.json
    python benchmarks/quality_curve.py --routed out/routed-0.5 --data builtin:heldout other.txt

The learned router is converted once (or loaded with --routed); each point is
``adaroute.eval.quality_curve.curve_point`` (see there for how the oracle is calibrated).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from adaroute.cli.common import format_table, setup_threads
from adaroute.data import load_texts
from adaroute.eval.quality_curve import curve_point, oracle_inputs
from adaroute.models import load_model
from adaroute.routing import routed_modules


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="dense model to convert (ignored with --routed)")
    p.add_argument("--routed", help="an existing routed model directory")
    p.add_argument("--preset", default="default", choices=["quick", "default"])
    p.add_argument("--calib", nargs="+", default=["builtin:calib"])
    p.add_argument("--data", nargs="+", default=["builtin:heldout"])
    p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.9, 0.7, 0.5, 0.4, 0.3])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens scored per data file")
    p.add_argument("--oracle-calib-tokens", type=int, default=4096)
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--no-start", action="store_true",
                   help="score windows without the start token (adaroute eval --no-start)")
    p.add_argument("--json", default="out/quality_curve.json")
    return p.parse_args(argv)


def routed_model(args):
    if args.routed:
        return load_model(args.routed)
    from adaroute.convert import convert

    result = convert(args.model, args.calib, density=0.5, preset=args.preset)
    return result.model, result.tokenizer


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_threads()
    model, tok = routed_model(args)
    mods = routed_modules(model)
    texts = load_texts(args.data)
    calib = [t.text for t in load_texts(args.calib)]
    inputs = None if args.no_oracle else oracle_inputs(model, tok, mods, calib, args.window, args.oracle_calib_tokens)
    rows, records = [], []
    for d in args.densities:
        for t in texts:
            rec = {"data": t.name, **curve_point(model, tok, mods, t.text, d, args.window, args.max_tokens, inputs,
                                                         not args.no_start)}
            records.append(rec)
            rows.append([t.name, d, rec["learned"]["perplexity_ratio"], rec["learned"]["ffn_bytes_share"],
                         rec["oracle"]["perplexity_ratio"] if rec["oracle"] else math.nan,
                         rec["learned"]["top1_agreement"]])
            print("  ".join(str(v) for v in rows[-1]), flush=True)
    print(format_table(["data", "density", "ratio learned", "cost learned", "ratio oracle", "top-1 agree"], rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": records}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
