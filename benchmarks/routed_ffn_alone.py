"""The FFN alone: where a routed layer's time goes, and one kernel library against another.

    python benchmarks/routed_ffn_alone.py [--base REV] [--layers 60] [--densities 0.35,0.5] [--tokens 1]
        [--rounds 8] [--json out/routed_ffn_alone.json]

Layers of the embedded model's FFN shape (H 576, F 1536) with random weights and a random int4 shadow,
each its own tensors, more of them than the last-level cache holds, so that every call reads from
memory as in decode. ``--tokens`` tokens in flight (decode of a batch: a routed unit is read once for
every token that chose it), the decode threads. The selection is forced through the unit biases
(+1e30 for the chosen units, -1e30 for the rest, threshold 0), so a case reads exactly the units it
names while the router still scores every unit:

* ``dense GEMVs``: the dense model's FFN (``ar_gate_up_silu`` then ``ar_linear`` over w_down);
* ``unit-packed, every unit``: the routed layer's dense arm (``ar_routed_ffn`` with ``all_units``);
* ``score only``: the routed kernel with nothing chosen (scoring, selection and the call's fixed cost);
* ``random d``: each layer its own random choice of a share d of the units (the gather's scattered reads);
* ``runs of 16, d``: the same share in runs of 16 adjacent units.

Every case runs once per round (order shuffled per round, the caches flushed before each case); the
table gives the median µs per layer and GB/s of weight bytes read. With ``--base`` the kernel library
built from that git revision's sources runs beside the working tree's, case by case, and the table adds
the median of the per-round ratios base/current (> 1: the working tree is faster); the machine's memory
speed drifts, so only such in-process ratios compare two versions.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adaroute.cli.common import thread_count
from adaroute.kernels import cpu

H, F, GROUP = 576, 1536, 32  # the embedded model's hidden size, FFN units and shadow scale group
UNIT_BYTES = 3 * H * 4       # one unit's gate row, up row and down column, float32
SHADOW_BYTES = 2 * F * (H // 2 + 4 * H // GROUP)  # int4 codes and float32 scales of gate and up


class Layers:
    """``n`` routed FFN layers' weights (unit-packed [F, 3H]), shadows (g16) and dense copies."""

    def __init__(self, n: int, tokens: int = 1):
        gen = torch.Generator().manual_seed(0)
        self.units = [torch.randn(F, 3 * H, generator=gen) for _ in range(n)]  # [F, 3H] each
        self.dense = [(u[:, :H].contiguous(), u[:, H:2 * H].contiguous(), u[:, 2 * H:].t().contiguous())
                      for u in self.units]  # w_gate [F, H], w_up [F, H], w_down [H, F]
        self.shadow_q = [torch.randint(0, 256, (2 * F, H // 2), dtype=torch.uint8, generator=gen) for _ in range(n)]
        self.shadow_scale = [torch.rand(2 * F, H // GROUP, generator=gen) * 0.01 for _ in range(n)]
        self.g16 = [cpu.shadow_g16(q, s) for q, s in zip(self.shadow_q, self.shadow_scale, strict=True)]
        self.tokens = tokens
        self.x = torch.randn(tokens, H, generator=gen)  # [T, H]
        self.y = torch.zeros(tokens, H)
        self.hidden = torch.empty(tokens, F)
        self.counts = torch.zeros(tokens, dtype=torch.int64)


def choose(layers: int, share: float, run: int, seed: int) -> list[torch.Tensor]:
    """Per layer a bool [F]: ``share`` of the units, in runs of ``run`` adjacent units."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        picked = torch.randperm(F // run, generator=gen)[: round(share * F / run)]
        mask = torch.zeros(F // run, dtype=torch.bool)
        mask[picked] = True
        out.append(mask.repeat_interleave(run))
    return out


def routed_case(lib, ly: Layers, masks: list[torch.Tensor] | None, all_units: bool = False):
    no_unit = torch.full((F,), -1e30)
    biases = [no_unit if m is None else torch.where(m, 1e30, -1e30).float() for m in masks or [None] * len(ly.units)]
    threads = thread_count()

    def run() -> None:
        for i, u in enumerate(ly.units):
            p = u.data_ptr()
            lib.ar_routed_ffn(ly.x.data_ptr(), ly.tokens, H, F, p, p + 4 * H, p + 8 * H, 3 * H,
                              ly.shadow_q[i].data_ptr(), ly.shadow_scale[i].data_ptr(), GROUP, biases[i].data_ptr(),
                              0.0, 0, F, int(all_units), ly.y.data_ptr(), ly.counts.data_ptr(), 1, threads, 0,
                              None, None, None, None, ly.g16[i].data_ptr())
    return run


def dense_case(lib, ly: Layers):
    threads = thread_count()
    rows = (ctypes.c_int64 * 1)(H)

    def run() -> None:
        for wg, wu, wd in ly.dense:
            lib.ar_gate_up_silu(ly.x.data_ptr(), ly.tokens, H, wg.data_ptr(), wu.data_ptr(), F,
                                ly.hidden.data_ptr(), threads)
            lib.ar_linear(ly.hidden.data_ptr(), ly.tokens, F, 1, (ctypes.c_void_p * 1)(wd.data_ptr()), rows,
                          ly.y.data_ptr(), H, 1, threads)
    return run


def cases(lib, ly: Layers, densities: list[float]) -> dict[str, tuple]:
    """name -> (run, weight bytes one call reads per layer)."""
    n = len(ly.units)
    out = {"dense GEMVs": (dense_case(lib, ly), F * UNIT_BYTES),
           "unit-packed, every unit": (routed_case(lib, ly, None, all_units=True), F * UNIT_BYTES),
           "score only": (routed_case(lib, ly, None), SHADOW_BYTES)}
    for d in densities:
        chosen = round(d * F) * UNIT_BYTES + SHADOW_BYTES
        out[f"random {d}"] = (routed_case(lib, ly, choose(n, d, 1, seed=1)), chosen)
        out[f"runs of 16, {d}"] = (routed_case(lib, ly, choose(n, d, 16, seed=2)), chosen)
    return out


def measure(runs: dict[str, object], rounds: int, layers: int) -> dict[str, list[float]]:
    flush = torch.zeros(24 << 20)  # 96 MB, more than the last-level cache
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        order = list(runs)
        random.Random(r).shuffle(order)
        for name in order:
            flush.add_(1.0)
            runs[name]()  # warm the call path; the weights stay colder than the cache
            t0 = time.perf_counter()
            for _ in range(3):
                runs[name]()
            times[name].append((time.perf_counter() - t0) / 3 / layers * 1e6)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="git revision whose kernel library runs beside the working tree's")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--densities", default="0.35,0.5")
    ap.add_argument("--tokens", type=int, default=1, help="tokens in flight (1-8)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", default="out/routed_ffn_alone.json")
    args = ap.parse_args()
    torch.set_num_threads(thread_count())
    libs = {"current": cpu.load_kernels()}
    if args.base:
        from kernel_ab import base_sources  # noqa: PLC0415 (a sibling script, only for --base)

        with tempfile.TemporaryDirectory() as tmp:
            libs = {"base": cpu.load_kernels(base_sources(args.base, Path(tmp))), **libs}
    if not 1 <= args.tokens <= cpu.MAX_GEMV_TOKENS:
        raise SystemExit(f"routed_ffn_alone: --tokens must be 1..{cpu.MAX_GEMV_TOKENS}")
    ly = Layers(args.layers, args.tokens)
    densities = [float(d) for d in args.densities.split(",")]
    per_lib = {name: cases(lib, ly, densities) for name, lib in libs.items()}
    runs = {f"{case} | {name}": run for name, cs in per_lib.items() for case, (run, _) in cs.items()}
    times = measure(runs, args.rounds, args.layers)
    rows = []
    print(f"{args.layers} layers from memory, {args.tokens} token(s), {thread_count()} threads, {args.rounds} rounds; "
          "µs per layer (median)")
    print(f"{'case':<26} {'µs':>7} {'GB/s':>6}" + ("  base µs  base/current" if args.base else ""))
    for case, (_, nbytes) in per_lib["current"].items():
        cur = statistics.median(times[f"{case} | current"])
        row = {"case": case, "us_per_layer": cur, "gb_per_s": nbytes / cur / 1e3}
        line = f"{case:<26} {cur:7.1f} {row['gb_per_s']:6.1f}"
        if args.base:
            base = times[f"{case} | base"]
            row["base_us_per_layer"] = statistics.median(base)
            row["base_over_current"] = statistics.median(
                [b / c for b, c in zip(base, times[f"{case} | current"], strict=True)])
            line += f"  {row['base_us_per_layer']:7.1f}  {row['base_over_current']:.3f}"
        rows.append(row)
        print(line)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"layers": args.layers, "tokens": args.tokens, "threads": thread_count(),
                               "rounds": args.rounds, "base": args.base, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
