"""Decode kernels on the embedded model's shapes: achieved bandwidth against the machine's own.

Prints a table and writes JSON. Every row is timed interleaved with the others (round-robin over
repeats, best-of kept), so machine load drifts hit all rows alike.

    python benchmarks/kernel_bench.py [--threads 1,2] [--json out.json]

Rows:
  copy / read      the machine: torch copy_ and sum over 256 MB (the bandwidth floor's input)
  gemv torch/cpu   one [49152, 576] matrix (the tied head) times one token
  ffn dense        one SwiGLU FFN layer (576 -> 1536 -> 576), torch vs our kernels
  ffn routed d     the fused routed kernel at density d (router included), same layer
  ffn packed d     the same on unit-packed weights (views of one [F, 3, H] store per layer)
  router           the router's scores alone (int8 activations x int4 shadow), same layer
  ffn packed d +adapter r   the packed routed kernel with a rank-r routing adapter (bytes: 3 r H + d F 3 r more)
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from adaroute.kernels import get_kernel, reference

H, F, V = 576, 1536, 49152


CLOCK = time.perf_counter  # --cpu-time: time.thread_time, which a busy machine's waiting does not inflate


def timed(fn, repeats: int) -> float:
    start = CLOCK()
    for _ in range(repeats):
        fn()
    return (CLOCK() - start) / repeats


def routed_layer(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w_gate": torch.randn(F, H, generator=g) / math.sqrt(H),
        "w_up": torch.randn(F, H, generator=g) / math.sqrt(H),
        "w_down_t": torch.randn(F, H, generator=g) / math.sqrt(F),
        "shadow_q": torch.randint(0, 256, (2 * F, H // 2), dtype=torch.uint8, generator=g),
        "shadow_scale": torch.rand(2 * F, H // 32, generator=g) * 0.02,
        "unit_bias": torch.zeros(F),
    }


def threshold_for(t: dict, x: torch.Tensor, density: float) -> float:
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    return float(torch.quantile(scores.flatten(), 1 - density))


def adapter(rank: int, seed: int) -> reference.Adapter:
    g = torch.Generator().manual_seed(seed)
    return reference.Adapter(torch.randn(2 * rank, H, generator=g) * 0.04, torch.randn(F, 3, rank, generator=g) * 0.01,
                             torch.randn(H, rank, generator=g) * 0.01)


def cases(tokens: int, adapt_rank: int = 16) -> dict:
    """name -> (callable, bytes read per call)."""
    cpu = get_kernel("cpu")
    big = torch.randn(64 << 20)  # 256 MB
    dst = torch.empty_like(big)
    head = torch.randn(V, H)
    x1 = torch.randn(tokens, H)
    layers = [routed_layer(i) for i in range(8)]  # 8 layers (85 MB) so weights stream from memory
    w_down = [t["w_down_t"].t().contiguous() for t in layers]
    ffn_bytes = 3 * F * H * 4
    router_bytes = 2 * F * (H // 2 + 4 * H // 32) + 4 * F
    out = {
        "copy (read+write)": (lambda: dst.copy_(big), 2 * big.numel() * 4),
        "read (sum)": (lambda: big.sum(), big.numel() * 4),
        "gemv head torch": (lambda: torch.nn.functional.linear(x1, head), head.numel() * 4),
        "gemv head cpu": (lambda: cpu.linear(x1, head), head.numel() * 4),
        "ffn dense torch x8": (lambda: [reference.dense_ffn(x1, t["w_gate"], t["w_up"], w_down[i])
                                        for i, t in enumerate(layers)], 8 * ffn_bytes),
        "ffn dense cpu x8": (lambda: [cpu.dense_ffn(x1, t["w_gate"], t["w_up"], w_down[i])
                                      for i, t in enumerate(layers)], 8 * ffn_bytes),
        "ffn unit-layout cpu x8": (lambda: [cpu.unit_ffn(x1, t["w_gate"], t["w_up"], t["w_down_t"])
                                            for t in layers], 8 * ffn_bytes),
    }
    packed = [{**t, **dict(zip(("w_gate", "w_up", "w_down_t"),
                               reference.unit_views(reference.pack_units(t["w_gate"], t["w_up"], t["w_down_t"])),
                               strict=True))} for t in layers]
    out["router cpu x8"] = (lambda: [cpu.router_scores(x1, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
                                     for t in layers], 8 * router_bytes)
    for d in (0.5, 0.35):
        ths = [threshold_for(t, x1, d) for t in layers]
        for label, ls in (("routed", layers), ("packed", packed)):
            out[f"ffn {label} {d} cpu x8"] = (
                lambda ths=ths, ls=ls: [cpu.routed_ffn(x1, **t, threshold=th, min_units=0, max_units=F)
                                        for t, th in zip(ls, ths, strict=True)],
                8 * (int(d * ffn_bytes) + router_bytes))
        if adapt_rank:
            ads = [adapter(adapt_rank, i) for i in range(len(layers))]
            out[f"ffn packed {d} +adapter r{adapt_rank} cpu x8"] = (
                lambda ths=ths, ads=ads: [cpu.routed_ffn(x1, **t, threshold=th, min_units=0, max_units=F, adapter=a)
                                          for t, th, a in zip(packed, ths, ads, strict=True)],
                8 * (int(d * ffn_bytes) + router_bytes + 4 * (3 * adapt_rank * H + int(d * F * 3 * adapt_rank))))
    return out


def run(threads: list[int], tokens: int, rounds: int, adapt_rank: int = 16) -> list[dict]:
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        table = cases(tokens, adapt_rank)
        best = {name: math.inf for name in table}
        for _ in range(rounds):
            for name, (fn, _) in table.items():
                fn()
                best[name] = min(best[name], timed(fn, 5))
        for name, (_, nbytes) in table.items():
            rows.append({"case": name, "threads": n, "tokens": tokens, "ms": round(best[name] * 1e3, 3),
                         "gb_per_s": round(nbytes / best[name] / 1e9, 2)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--adapt-rank", type=int, default=16, help="rank of the routing-adapter rows (0: none)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with this thread's CPU time (needs --threads 1): stable on a shared machine")
    p.add_argument("--json")
    args = p.parse_args()
    if args.cpu_time:
        if args.threads != "1":
            p.error("--cpu-time measures the calling thread only: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    rows = run([int(t) for t in args.threads.split(",")], args.tokens, args.rounds, args.adapt_rank)
    print(f"{'case':<38}{'threads':>8}{'ms':>10}{'GB/s':>8}")
    for r in rows:
        print(f"{r['case']:<38}{r['threads']:>8}{r['ms']:>10.3f}{r['gb_per_s']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
