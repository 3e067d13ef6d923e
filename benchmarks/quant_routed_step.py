"""Where a routed quantised model's decode time goes: the one-call step at several densities, with and
without routing adapters, beside dense; and the routed FFN kernel over every layer with unit sets
forced through the biases (contiguous, strided, random), rows coming from memory.

    python benchmarks/quant_routed_step.py DIR [--densities 0.05 0.2 0.5 0.9] [--rounds 3] [--unit-sets]

DIR: a routed directory (converted at --weights q8/q4, or float32: then --weights picks the format).
Step rows: ms per decoded token (best of ``--rounds``, 48 greedy tokens after an 8-token prompt, the
fail-safe off so every layer runs the router's own selection). Unit-set rows: µs per layer, the
kernel called layer after layer for one token (Python call overhead included, equal in every row).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

PROMPT = [[1, 504, 3158, 314, 2887, 7573, 30, 2]]


def step_ms(engine, tokens: int = 48) -> float:
    cache = engine.new_cache(1, 256)
    tok = engine.forward(torch.tensor(PROMPT), cache).reshape(1, -1).argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(tokens):
        tok = engine.forward(tok, cache).reshape(1, -1).argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / tokens * 1e3


def unit_sets(w, rounds: int) -> None:
    from adaroute.kernels import quant_cpu

    ffns = [ly.ffn for ly in w.layers]
    f = ffns[0].w_gate.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, w.hidden, generator=g) * 0.05
    sets = {"none": torch.zeros(f, dtype=torch.bool), "contiguous half": torch.arange(f) < f // 2,
            "every other": torch.arange(f) % 2 == 0, "random half": torch.rand(f, generator=g) < 0.5,
            "random quarter": torch.rand(f, generator=g) < 0.25, "every fourth": torch.arange(f) % 4 == 0,
            "all": torch.ones(f, dtype=torch.bool)}
    print(f"{'unit set':<18}{'units':>7}{'µs per layer':>14}")
    for name, mask in sets.items():
        bias = torch.where(mask, torch.tensor(60.0), torch.tensor(-60.0))  # scores far above / below 0

        def run(bias=bias):
            for ffn in ffns:
                quant_cpu.routed_ffn(x, ffn.w_gate, ffn.w_up, ffn.w_down_t, ffn.shadow_q, ffn.shadow_scale, bias, 0.0,
                                     0, f)
        run()
        best = 1e9
        for _ in range(rounds * 2):
            start = time.perf_counter()
            for _ in range(10):
                run()
            best = min(best, (time.perf_counter() - start) / 10 / len(ffns) * 1e6)
        print(f"{name:<18}{int(mask.sum()):>7}{best:>14.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("--weights", help="format for a float32 directory (q8, q4)")
    p.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.2, 0.5, 0.9])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--unit-sets", action="store_true", help="also the kernel with forced unit sets")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from adaroute.models import load_model
    from adaroute.routing.profile import apply_density
    from adaroute.routing.surgery import routed_modules
    from adaroute.runtime import Engine, ExecutionPolicy
    from adaroute.runtime.formats import runtime_weights

    model, _ = load_model(args.directory)
    mods = routed_modules(model)
    w = runtime_weights(model, args.weights, 512)
    bare = dataclasses.replace(w, layers=[dataclasses.replace(ly, ffn=dataclasses.replace(ly.ffn, adapter=None))
                                          for ly in w.layers])
    cases = [("dense", w, None)] + [(f"routed {d}", w, d) for d in args.densities]
    if any(ly.ffn.adapter is not None for ly in w.layers):
        cases += [(f"routed {d}, no adapters", bare, d) for d in args.densities]
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved rounds
        for name, weights, density in cases:
            if density is not None:
                apply_density(mods, density)
            engine = Engine(weights, policy=ExecutionPolicy.always_dense() if density is None else ExecutionPolicy())
            engine.failsafe = None
            times.setdefault(name, []).append(step_ms(engine))
    dense = min(times["dense"])
    print(f"{'step':<28}{'ms/token':>10}{'vs dense':>10}  rounds")
    for name, ts in times.items():
        print(f"{name:<28}{min(ts):>10.2f}{dense / min(ts):>9.2f}x  {', '.join(f'{t:.2f}' for t in ts)}")
    if args.unit_sets:
        unit_sets(w, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
