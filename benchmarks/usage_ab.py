"""Cost of the unit-usage counter (``Engine.unit_usage``, what the server's imbalance gauge reads):
the same routed engine counting and not, alternating whole greedy generations through the runtime's
generate loop (as `adaroute bench` times them).

    python benchmarks/usage_ab.py --routed DIR [--rounds 5] [--new-tokens 128] [--json out/usage_ab.json]

The first round of each mode is a warm-up; medians over the rest, and the ratio of each round's pair
(on / off), which is what a machine shared with other jobs still measures fairly.
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default="out/usage_ab.json")
    args = ap.parse_args()
    torch.set_num_threads(thread_count())
    model, tokenizer = load_model(args.routed)
    engine = Engine.from_model(model)
    prompt = bench_prompts(tokenizer, 1, 64)[0]
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in rates:
            engine.unit_usage = None
            if mode == "on":
                engine.start_unit_usage()
            out = generate(engine, [prompt], args.new_tokens)
            rates[mode].append(len(out.step_s) / sum(out.step_s))
    pairs = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)][1:]
    summary = {"median": {k: statistics.median(v[1:] or v) for k, v in rates.items()},
               "pair_ratio_median": statistics.median(pairs or [float("nan")]),
               "selected_per_step": int(engine.unit_usage.sum()) / args.new_tokens}
    for k, v in rates.items():
        print(f"usage {k:>3}: {summary['median'][k]:6.1f} tok/s  rounds {[round(x, 1) for x in v]}")
    print(f"on / off per round: {[round(p, 3) for p in pairs]}  median {summary['pair_ratio_median']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rates": rates, **summary, "threads": torch.get_num_threads()},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
