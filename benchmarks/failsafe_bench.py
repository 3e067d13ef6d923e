"""What the per-token fail-safe costs: routed greedy decode with it on, off, and on with injected faults.

    python benchmarks/failsafe_bench.py --routed /tmp/routed-0.5 [--steps 600] [--json OUT]

One engine over the routed model decodes one sequence greedily; the modes take turns step by step
(step i runs mode i mod 3), so slow phases of a shared machine hit every mode alike, and each mode's
tokens/s is one over its median step time (a median over hundreds of steps shrugs off the steps
another process stole). ``on + faults`` injects a raising or NaN-producing sparse kernel on 10 % of
its steps (one routed layer each): every such token is recomputed densely, and no step may fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from adaroute.cli.common import format_table, setup_threads
from adaroute.models import load_model
from adaroute.runtime import Engine
from adaroute.runtime.failsafe import FailSafe, FaultInjector

PROMPT_TEXT = "The history of the Python programming language begins in the late 1980s, when"


def interleaved_step_times(engine: Engine, prompt: list[int], modes: dict, steps: int) -> dict[str, list[float]]:
    """Per mode, the wall time of each decode step it ran (modes take turns step by step)."""
    cache = engine.new_cache(1, len(prompt) + steps + 1)
    token = int(engine.forward(torch.tensor([prompt]), cache).argmax())
    times: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    for i in range(steps):
        name = names[i % len(names)]
        engine.failsafe = modes[name]
        start = time.perf_counter()
        logits = engine.forward(torch.tensor([[token]]), cache)
        token = int(logits.argmax())
        times[name].append(time.perf_counter() - start)
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"step {i} ({name}) gave non-finite logits")
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routed", required=True, help="a routed model directory")
    ap.add_argument("--steps", type=int, default=600, help="decode steps in all (split among the modes)")
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
    interleaved_step_times(engine, prompt, modes, 30)  # warm-up (kernel build, caches)
    guard.totals.zero_()
    faulty.totals.zero_()
    faulty.faults.steps = faulty.faults.faulty_steps = 0
    times = interleaved_step_times(engine, prompt, modes, args.steps)
    med = {m: 1.0 / statistics.median(v) for m, v in times.items()}
    rows = [[m, len(times[m]), round(med[m], 2), f"{med[m] / med['off']:.3f}"] for m in modes]
    print(f"routed decode, {args.steps} steps interleaved over {len(modes)} modes, {torch.get_num_threads()} threads")
    print(format_table(["fail-safe", "steps", "tokens/s (1 / median step)", "vs off"], rows))
    events = {f"{layer}/{reason}": n for (layer, reason), n in faulty.events().items()}
    print(f"faults: {faulty.faults.faulty_steps} of {faulty.faults.steps} steps faulty, "
          f"{sum(events.values())} tokens recomputed densely by the faulty mode, 0 failed steps; "
          f"healthy mode's band events: {int(guard.totals.sum())} of {len(times['on']) * len(guard.routed)} "
          "layer-token slots")
    result = {"routed": args.routed, "threads": torch.get_num_threads(), "steps": args.steps,
              "median_step_s": {m: statistics.median(v) for m, v in times.items()}, "tps": med,
              "on_vs_off": med["on"] / med["off"], "faulty_steps": faulty.faults.faulty_steps,
              "fault_steps_seen": faulty.faults.steps, "fault_events": events,
              "healthy_band_events": int(guard.totals.sum())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
