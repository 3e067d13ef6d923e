"""What one runtime feature costs in decode: the same routed model with the feature on and off,
alternating whole greedy generations through the runtime's generate loop (as `adaroute bench` times them).

    python benchmarks/engine_ab.py --routed DIR --feature adapters|failsafe|usage|head|scoring-copy [--rounds 5]
        [--new-tokens 128] [--weights f32|q8|q4] [--head-rows 1024] [--json out/engine_ab-FEATURE.json]

Features: ``adapters`` the routing adapters a routed directory stores (off: the same weights and
routers without them; the selection does not depend on them, so both read the same units);
``failsafe`` the per-token dense fail-safe; ``usage`` the unit-usage counter behind the server's
imbalance gauge; ``head`` the routed output head with ``--head-rows`` exact rows (off: the exact head;
float32 only; both engines score as the one with the head may within the memory budget);
``scoring-copy`` the routers' shadows in the g16 scoring layout, as the runtime holds them where
the compiled step runs (``fused_cpu.scoring_layout``; off: the same shadows in rows, scored from
the rows with no copy). Both engines share one copy of the weights. The first round is a warm-up; the
table gives medians over the rest and the median of each round's on/off ratio, which a machine shared
with other jobs still measures fairly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from adaroute import load_model
from adaroute.cli.common import thread_count
from adaroute.eval.bench import bench_prompts
from adaroute.runtime import Engine, ModelWeights, generate
from adaroute.runtime.formats import runtime_weights
from adaroute.runtime.head import routed_head
from adaroute.runtime.quant_step import fused_decoder
from adaroute.runtime.weights import RoutedFFN


def without_adapters(w: ModelWeights) -> ModelWeights:
    """The same tensors, every routed layer's adapter dropped."""
    layers = [dataclasses.replace(ly, ffn=dataclasses.replace(ly.ffn, adapter=None))
              if isinstance(ly.ffn, RoutedFFN) else ly for ly in w.layers]
    return dataclasses.replace(w, layers=layers)


def with_rows(w: ModelWeights) -> ModelWeights:
    """The same weights with every router's shadow in rows (``RoutedFFN.shadow_rows``), not g16."""
    layers = []
    for ly in w.layers:
        f = ly.ffn
        if isinstance(f, RoutedFFN) and f.shadow_g16 is not None:
            q, s = f.shadow_rows()
            f = dataclasses.replace(f, shadow_q=q, shadow_scale=s, shadow_g16=None)
        layers.append(dataclasses.replace(ly, ffn=f))
    return dataclasses.replace(w, layers=layers)


def engines(feature: str, w: ModelWeights, head_rows: int = 1024) -> dict[str, Engine]:
    on, off = Engine(w), Engine(w)
    if feature == "head":
        if w.head.dtype != torch.float32:
            raise SystemExit("engine_ab: the routed head runs on a float32 head (use --weights f32)")
        w = dataclasses.replace(w, routed_head=None)
        on, off = Engine(dataclasses.replace(w, routed_head=routed_head(w.head, head_rows))), Engine(w)
        off.scoring_copy, off._fused = on.scoring_copy, fused_decoder(w, on.scoring_copy)  # only the head differs
    elif feature == "scoring-copy":
        rows = with_rows(w)
        off = Engine(rows)
        off.scoring_copy, off._fused = False, fused_decoder(rows, False)
    elif feature == "adapters":
        if not any(isinstance(ly.ffn, RoutedFFN) and ly.ffn.adapter is not None for ly in w.layers):
            raise SystemExit("engine_ab: this model has no routing adapters (convert without --no-adapt)")
        off = Engine(without_adapters(w))
    elif feature == "failsafe":
        off.failsafe = None
    else:
        on.start_unit_usage()
    return {"on": on, "off": off}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routed", required=True)
    ap.add_argument("--feature", required=True, choices=["adapters", "failsafe", "usage", "head", "scoring-copy"])
    ap.add_argument("--head-rows", type=int, default=1024, help="exact rows per token of the routed head")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--weights", default="f32", help="weight format the engines run at (f32, q8, q4)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(thread_count())
    model, tokenizer = load_model(args.routed)
    pair = engines(args.feature, runtime_weights(model, args.weights), args.head_rows)
    prompt = bench_prompts(tokenizer, 1, 64)[0]
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for mode, engine in pair.items():
            out = generate(engine, [prompt], args.new_tokens)
            rates[mode].append(len(out.step_s) / sum(out.step_s))
    ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)][1:]
    summary = {"median": {k: statistics.median(v[1:] or v) for k, v in rates.items()},
               "pair_ratio_median": statistics.median(ratios or [float("nan")])}
    for k, v in rates.items():
        print(f"{args.feature} {k:>3}: {summary['median'][k]:6.1f} tok/s  rounds {[round(x, 1) for x in v]}")
    print(f"on / off per round: {[round(r, 3) for r in ratios]}  median {summary['pair_ratio_median']:.3f}")
    out = Path(args.json or f"out/engine_ab-{args.feature}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"feature": args.feature, "rates": rates, **summary,
                               "threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
