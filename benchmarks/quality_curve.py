"""Perplexity ratio (routed / dense) against mean FFN density, learned router beside the hindsight oracle.

    python benchmarks/quality_curve.py --preset quick --json out/quality_curve.json
    python benchmarks/quality_curve.py --routed out/routed-0.5 --data builtin:heldout other.txt

The learned router is converted once (or loaded with --routed) and moved to each density with the
density override (per-layer densities re-allocated from the stored sensitivities, thresholds
interpolated). The oracle scores units by their exact contribution and gets per-layer thresholds
calibrated on the same calibration text, at the same per-layer densities.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from adaroute.cli.common import format_table, setup_threads
from adaroute.data import load_texts
from adaroute.models import load_model
from adaroute.routing import LayerPolicy, routed_modules
from adaroute.routing.policy import calibrate_thresholds
from adaroute.routing.profile import apply_density
from adaroute.routing.quality import compare_with_dense
from adaroute.routing.router import OracleRouter
from adaroute.training.capture import capture_inputs, token_windows


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
    p.add_argument("--json", default="out/quality_curve.json")
    return p.parse_args(argv)


def routed_model(args):
    if args.routed:
        return load_model(args.routed)
    from adaroute.convert import convert

    result = convert(args.model, args.calib, density=0.5, preset=args.preset)
    return result.model, result.tokenizer


@contextmanager
def oracle_routers(mods, inputs, per_layer):
    """Swap in exact-contribution routers with thresholds calibrated at ``per_layer`` densities."""
    saved = [(m.router, m.policy) for m in mods]
    try:
        for m, x, d in zip(mods, inputs, per_layer, strict=True):
            m.router = OracleRouter(m.w_gate, m.w_up, m.w_down_t, m.act_fn)
            if d < 1.0:
                with torch.no_grad():
                    th = calibrate_thresholds(m.router.score(x), [d], m.profile.min_units, m.profile.max_units)[0]
                m.set_policy(LayerPolicy(th, m.profile.min_units, m.profile.max_units))
        yield
    finally:
        for m, (router, policy) in zip(mods, saved, strict=True):
            m.router = router
            m.set_policy(policy)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_threads()
    model, tok = routed_model(args)
    mods = routed_modules(model)
    texts = load_texts(args.data)
    calib = [t.text for t in load_texts(args.calib)]
    inputs = None
    if not args.no_oracle:
        wins = token_windows(tok, calib, args.window, args.oracle_calib_tokens)
        inputs = capture_inputs(model, mods, wins).inputs
    rows, records = [], []
    for d in args.densities:
        for t in texts:
            rec = measure(model, tok, mods, t, d, args, inputs)
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


def measure(model, tok, mods, text, density, args, inputs) -> dict:
    learned = compare_with_dense(model, tok, text.text, args.window, args.max_tokens, density=density,
                                 desc=f"learned {density}")
    oracle = None
    if inputs is not None:
        saved = [m.policy for m in mods]
        per_layer = apply_density(mods, density)
        with oracle_routers(mods, inputs, per_layer):
            oracle = compare_with_dense(model, tok, text.text, args.window, args.max_tokens, desc=f"oracle {density}")
        for m, p in zip(mods, saved, strict=True):
            m.set_policy(p)
    return {"data": text.name, "density": density, "learned": learned, "oracle": oracle}


if __name__ == "__main__":
    raise SystemExit(main())
