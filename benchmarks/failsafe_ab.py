"""Fail-safe cost on whole generations: the same routed engine with its fail-safe on and off,
alternating, greedy decode through the runtime's generate loop (as `adaroute bench` times it).

    python benchmarks/failsafe_ab.py --routed DIR [--rounds 4] [--new-tokens 128] [--json out/failsafe_ab.json]

The first round of each mode is a warm-up; medians over the rest. Complements failsafe_bench.py,
which alternates single steps (and is sensitive to a busy machine, see docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from adaroute import load_model
from adaroute.cli.common import thread_count
from adaroute.eval.bench import bench_prompts
from adaroute.runtime import Engine, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routed", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default="out/failsafe_ab.json")
    args = ap.parse_args()
    torch.set_num_threads(thread_count())
    model, tokenizer = load_model(args.routed)
    engine = Engine.from_model(model)
    guard = engine.failsafe
    prompt = bench_prompts(tokenizer, 1, 64)[0]
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for mode in rates:
            engine.failsafe = guard if mode == "on" else None
            out = generate(engine, [prompt], args.new_tokens)
            rates[mode].append(len(out.step_s) / sum(out.step_s))
    med = {k: statistics.median(v[1:] or v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"fail-safe {k:>3}: {med[k]:6.1f} tok/s  rounds {[round(x, 1) for x in v]}")
    print(f"on / off: {med['on'] / med['off']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rates": rates, "median": med, "threads": torch.get_num_threads()},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
