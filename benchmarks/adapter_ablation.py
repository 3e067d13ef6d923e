"""Ablation of the distillation stage: no adapters / router-only distillation / routing adapters,
stabilisation terms on and off, adapter rank, at several densities, on held-out text.

    python benchmarks/adapter_ablation.py --densities 0.35 0.5 --variants none adapters \
        --data builtin:heldout licences.txt readmes.txt --eval-tokens 1024 --json out/adapter_ablation.json

The density-independent stages (capture, shadow codes, sensitivity) run once
(``training.trainer.prepare_routers``); every (density, variant) is then finished from a copy of
that state with ``finish_routers``, exactly as ``convert`` would finish it with the variant's
training settings. Each row is ``compare_with_dense`` on the first ``--eval-tokens`` of each file.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from adaroute.cli.common import format_table, setup_threads
from adaroute.config import RoutingConfig, TrainConfig
from adaroute.data import load_texts
from adaroute.models import load_model
from adaroute.routing import route_model
from adaroute.routing.quality import compare_with_dense
from adaroute.training.trainer import finish_routers, prepare_routers

# Training overrides per variant, on top of the preset.
VARIANTS = {
    "none": dict(distill_steps=0, adapt_rank=0),
    "router": dict(adapt_rank=0),
    "adapters": dict(),
    "adapters-no-z": dict(z_loss=0.0),
    "adapters-no-usage": dict(usage_loss=0.0),
    "adapters-no-terms": dict(z_loss=0.0, usage_loss=0.0),
    "rank8": dict(adapt_rank=8),
    "rank16": dict(adapt_rank=16),
    "rank32": dict(adapt_rank=32),
    "adapters-selfgen": dict(distill_generated=16384),  # + 16k tokens the dense model sampled itself
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", default="default", choices=["quick", "default"])
    p.add_argument("--calib", nargs="+", default=["builtin:calib"])
    p.add_argument("--calib-tokens", type=int, help="override the preset's capture tokens")
    p.add_argument("--sensitivity-tokens", type=int, help="override the preset's Fisher tokens")
    p.add_argument("--steps", type=int, help="override the preset's distillation steps")
    p.add_argument("--distill-tokens", type=int, help="override the preset's distillation text tokens")
    p.add_argument("--densities", nargs="+", type=float, default=[0.35, 0.5])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["none", "router", "adapters"])
    p.add_argument("--data", nargs="+", default=["builtin:heldout"])
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--no-start", action="store_true",
                   help="score windows without the start token (adaroute eval --no-start)")
    p.add_argument("--json", default="out/adapter_ablation.json")
    return p.parse_args(argv)


def train_config(args, variant: str) -> TrainConfig:
    over = {k: v for k, v in (("calib_tokens", args.calib_tokens), ("sensitivity_tokens", args.sensitivity_tokens),
                              ("distill_steps", args.steps), ("distill_tokens", args.distill_tokens)) if v}
    return TrainConfig.from_name(args.preset, **{**over, **VARIANTS[variant]})


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_threads()
    model, tok = load_model(args.model)
    model.eval()
    calib = [t.text for t in load_texts(args.calib)]
    data = load_texts(args.data)
    mods = route_model(model)
    base = train_config(args, "none")
    prep = prepare_routers(model, tok, calib, mods, RoutingConfig(density=args.densities[0]), base)
    routers = [copy.deepcopy(m.router.state_dict()) for m in mods]
    records, rows = [], []
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        for d in args.densities:
            for m, state in zip(mods, routers, strict=True):  # back to the prepared routers, no adapters
                m.router.load_state_dict(state)
                m.adapter = None
            train = train_config(args, variant)
            start = time.perf_counter()
            report = finish_routers(model, tok, calib, mods, RoutingConfig(density=d, layer_min_density=min(0.15, d)),
                                    train, prep)
            seconds = time.perf_counter() - start
            for t in data:
                r = compare_with_dense(model, tok, t.text, max_tokens=args.eval_tokens, desc=f"{variant} {d} {t.name}",
                                       start=not args.no_start)
                rec = {"density": d, "variant": variant, "data": t.name, "train_seconds": seconds,
                       "distill_steps": train.distill_steps, "adapt_rank": train.adapt_rank,
                       "final_distill_loss": report.distill_loss[-1] if report.distill_loss else None,
                       **{k: r[k] for k in ("perplexity_ratio", "top1_agreement", "mean_density", "ffn_bytes_share",
                                            "adapter_bytes_share", "tokens")}}
                records.append(rec)
                rows.append([d, variant, t.name, f"{r['perplexity_ratio']:.3f}", f"{r['top1_agreement']:.3f}",
                             f"{r['mean_density']:.3f}", f"{r['ffn_bytes_share']:.3f}",
                             f"{r['adapter_bytes_share']:.4f}", round(seconds)])
                out.write_text(json.dumps(records, indent=2) + "\n")  # after every row: a long run keeps its results
                print(format_table(["density", "variant", "data", "ppl ratio", "top-1", "density", "cost", "adapter",
                                    "train s"], rows[-1:]), flush=True)
    print(format_table(["density", "variant", "data", "ppl ratio", "top-1", "density", "cost", "adapter", "train s"],
                       rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
