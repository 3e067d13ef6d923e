"""What the per-token fail-safe costs: routed greedy decode with it on, off, and on with injected faults.

    python benchmarks/failsafe_bench.py --routed /tmp/routed-0.5 [--rounds 5] [--new-tokens 128] [--json OUT]

One engine over the routed model; the modes take turns within each round (so machine load hits them
alike) and each mode's tokens/s is the median over rounds, timed from the second token. ``faults``
injects a raising or NaN-producing sparse kernel on 10 % of decode steps (one routed layer each):
every such token is recomputed densely, and no step may fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from adaroute.cli.common import format_table, setup_threads
from adaroute.models import load_model
from adaroute.runtime import Engine, generate
from adaroute.runtime.failsafe import FailSafe, FaultInjector

PROMPT_TEXT = "The history of the Python programming language begins in the late 1980s, when"


def decode_tps(engine: Engine, prompt: list[int], new_tokens: int) -> float:
    out = generate(engine, [prompt], new_tokens)
    if len(out.tokens[0]) != new_tokens:
        raise RuntimeError(f"decode stopped after {len(out.tokens[0])} of {new_tokens} tokens")
    return len(out.step_s) / sum(out.step_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routed", required=True, help="a routed model directory")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--fault-rate", type=float, default=0.1)
    ap.add_argument("--json", default="out/failsafe_bench.json")
    args = ap.parse_args(argv)
    setup_threads()
    model, tok = load_model(args.routed)
    prompt = list(tok(PROMPT_TEXT * 4).input_ids)[:64]
    engine = Engine.from_model(model)
    guard = engine.failsafe
    faulty = FailSafe(engine.w, FaultInjector(("raise", "nan"), args.fault_rate, seed=0))
    modes = {"off": None, "on": guard, "on + faults": faulty}
    for fs in modes.values():  # warm-up (kernel build, caches)
        engine.failsafe = fs
        decode_tps(engine, prompt, 16)
    tps: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, fs in modes.items():
            engine.failsafe = fs
            tps[mode].append(decode_tps(engine, prompt, args.new_tokens))
    med = {m: statistics.median(v) for m, v in tps.items()}
    rows = [[m, round(med[m], 2), f"{med[m] / med['off']:.3f}", " ".join(f"{v:.1f}" for v in tps[m])] for m in modes]
    print(f"routed decode, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, median of {args.rounds}")
    print(format_table(["fail-safe", "tokens/s", "vs off", "rounds"], rows))
    events = {f"{layer}/{reason}": n for (layer, reason), n in faulty.events().items()}
    print(f"faults: {faulty.faults.faulty_steps} of {faulty.faults.steps} steps faulty, "
          f"{sum(events.values())} tokens recomputed densely, 0 failed steps; healthy band events: "
          f"{int(guard.totals.sum())}")
    result = {"routed": args.routed, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
              "rounds": tps, "median_tps": med, "on_vs_off": med["on"] / med["off"],
              "faulty_steps": faulty.faults.faulty_steps, "steps": faulty.faults.steps,
              "fault_events": events, "healthy_band_events": int(guard.totals.sum())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
