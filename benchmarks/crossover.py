"""Where sparse stops paying: routed FFN (score -> select -> gather) against the dense FFN of the
same routed layers, by tokens in flight, on the embedded model's real hidden states.

    python benchmarks/crossover.py [--density 0.5] [--tokens 1,2,4,8,16,32] [--json out.json]

With T tokens in one call the router runs T times and the union of the T tokens' unit sets is
gathered, so the sparse advantage shrinks as T grows. The largest T at which sparse still wins is
the execution policy's ``sparse_max_tokens`` (adaroute/runtime/policy.py).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adaroute.kernels import get_kernel


def layer_inputs(model, tokenizer, tokens: int) -> list[torch.Tensor]:
    """Each routed layer's FFN input [tokens, H] on Python documentation text."""
    from pydoc_data.topics import topics

    from adaroute.routing import routed_modules

    ids = torch.tensor([tokenizer(topics["for"] + topics["while"]).input_ids[:tokens]])
    seen = {}
    mods = routed_modules(model)
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod.layer_idx, a[0][0].contiguous()))
             for m in mods]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [seen[m.layer_idx] for m in mods]


def time_call(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(model, tokenizer, token_counts: list[int], rounds: int) -> list[dict]:
    from adaroute.runtime.weights import from_model

    kernel = get_kernel("cpu")
    layers = [ly.ffn for ly in from_model(model, 512).layers]
    xs = layer_inputs(model, tokenizer, max(token_counts) + 1)

    def sparse(t):
        return lambda: [kernel.routed_ffn(x[1:t + 1].contiguous(), f.w_gate, f.w_up, f.w_down_t, f.shadow_q,
                                          f.shadow_scale, f.unit_bias, *f.policy())
                        for f, x in zip(layers, xs, strict=True)]

    def dense(t):
        return lambda: [kernel.unit_ffn(x[1:t + 1].contiguous(), f.w_gate, f.w_up, f.w_down_t)
                        for f, x in zip(layers, xs, strict=True)]

    rows = []
    for t in token_counts:
        s, d = sparse(t), dense(t)
        best_s = best_d = float("inf")
        for _ in range(rounds):  # interleaved, so load changes hit both
            best_s, best_d = min(best_s, time_call(s, 1)), min(best_d, time_call(d, 1))
        rows.append({"tokens": t, "sparse_ms": round(1e3 * best_s, 2), "dense_ms": round(1e3 * best_d, 2),
                     "sparse_over_dense": round(best_s / best_d, 3)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--tokens", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args()
    from decode_bench import calibrated_copy

    from adaroute.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    routed = calibrated_copy(model, tokenizer, args.density)
    rows = measure(routed, tokenizer, [int(t) for t in args.tokens.split(",")], args.rounds)
    print(f"threads {torch.get_num_threads()}, density {args.density}, all {len(routed.model.layers)} FFN layers")
    print(f"{'tokens':>7}{'sparse ms':>11}{'dense ms':>10}{'sparse/dense':>14}")
    for r in rows:
        print(f"{r['tokens']:>7}{r['sparse_ms']:>11.2f}{r['dense_ms']:>10.2f}{r['sparse_over_dense']:>14.3f}")
    wins = [r["tokens"] for r in rows if r["sparse_over_dense"] < 0.97]
    print(f"sparse wins (by > 3 %) up to {max(wins) if wins else 0} tokens in flight")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "density": args.density, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
