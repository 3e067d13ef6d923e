"""A routed model at each weight format: quality and decode speed, dense and routed, per density.

    python benchmarks/quant_routed.py DIR [--formats f32,q8_0,q4_1] [--densities 0.5,0.35]
        [--routers exact] [--ppl-tokens 4096] [--threads 1] [--repeats 3] [--new-tokens 64] [--json OUT]

DIR is a routed model directory (``adaroute convert``). Each format's weights come from the same
float32 model through ``quant_weights.quantise`` (ggml's rounding; ``--routers exact,shadow`` runs
quantised routed layers with each router side by side; float32 always uses the int4 shadow).
Perplexity on ``builtin:heldout`` (512-token windows) is computed by the runtime itself: dense with
every FFN unit, routed with every token of every window sparse (the routed model's
semantics), so each ratio is to float32 dense on the same windows. Speed: ``run_engines``
(interleaved rounds, batch 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from adaroute import load_model
from adaroute.data import load_text
from adaroute.eval.bench import _fmt, bench_prompts, run_engines, runtime_engine
from adaroute.eval.perplexity import text_windows, window_nll
from adaroute.routing.profile import apply_density
from adaroute.runtime import Engine, ExecutionPolicy
from adaroute.runtime.quant_weights import quantise
from adaroute.runtime.weights import from_model


def ppl(weights, policy, wins) -> float:
    engine, nll, scored = Engine(weights, policy=policy), 0.0, 0
    for w in wins:
        nll += window_nll(engine.forward(w, engine.new_cache(1, w.shape[1]), all_logits=True), w).item()
        scored += w.shape[1] - 1
    return math.exp(nll / scored)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--formats", default="f32,q8_0,q4_1")
    p.add_argument("--densities", default="0.5,0.35")
    p.add_argument("--routers", default="exact", help="quantised routed layers: exact, shadow or both")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--no-start", action="store_true", help="perplexity windows without the start token")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    mods = [m for m in model.modules() if hasattr(m, "w_down_t")]
    base = from_model(model, 1024)
    formats = args.formats.split(",")
    wins = text_windows(tokenizer, load_text("builtin:heldout").text, 512, args.ppl_tokens,
                        not args.no_start) if args.ppl_tokens else []
    rows, dense = [], {}
    for density in map(float, args.densities.split(",")):
        apply_density(mods, density)
        weights = {f"{f} {r}" if f != "f32" else f: base if f == "f32" else quantise(base, f, router=r)
                   for f in formats for r in args.routers.split(",")}
        if wins and not dense:
            dense = {f: ppl(w, ExecutionPolicy.always_dense(), wins) for f, w in weights.items()}
        engines = []
        for f, w in weights.items():
            engines += [runtime_engine(None, routed=False, name=f"{f} dense", weights=w),
                        runtime_engine(None, routed=True, name=f"{f} routed", weights=w)]
        records = {r.engine: r for r in run_engines(engines, bench_prompts(tokenizer, 1, 64), args.new_tokens,
                                                    args.repeats)}
        for f, w in weights.items():
            routed_ppl = ppl(w, ExecutionPolicy.always_sparse(), wins) if wins else None
            for kind, value in (("dense", dense.get(f)), ("routed", routed_ppl)):
                r = records[f"{f} {kind}"]
                router = "shadow" if w.layers[0].ffn.int4_shadow else "exact"
                name = kind if kind == "dense" else f"routed ({router})"
                rows.append({"format": f, "engine": name, "density": density if kind == "routed" else 1.0,
                             "realised_density": r.density, "tokens_per_s": r.decode_tokens_per_s,
                             "mb_per_token": r.weight_mb_per_step, "perplexity": value,
                             "ppl_ratio": value / dense["f32"] if value and "f32" in dense else None,
                             "vs_f32_dense": r.decode_tokens_per_s / records["f32 dense"].decode_tokens_per_s
                             if "f32 dense" in records else None})
    print(f"threads {args.threads}, batch 1, {args.new_tokens} new tokens, {args.repeats} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.1f}; perplexity: builtin:heldout, {args.ppl_tokens} tokens")
    print(f"{'format':<12}{'engine':<17}{'density':>8}{'tok/s':>8}{'MB/token':>10}{'vs f32 dense':>14}{'ppl':>9}"
          f"{'ratio':>8}")
    for r in rows:
        print(f"{r['format']:<12}{r['engine']:<17}{_fmt(r['realised_density'] or r['density'], '.2f'):>8}"
              f"{r['tokens_per_s']:>8.1f}{_fmt(r['mb_per_token'], '.0f'):>10}{_fmt(r['vs_f32_dense'], '.2f', 'x'):>14}"
              f"{_fmt(r['perplexity'], '.3f'):>9}{_fmt(r['ppl_ratio'], '.3f'):>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "load": os.getloadavg(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
