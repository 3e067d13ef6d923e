"""Decode speed with the kernel library of an earlier revision beside the working tree's, in one process.

    python benchmarks/kernel_ab.py MODEL [--base HEAD] [--engines dense,routed] [--weights f32|q8|q4]
        [--gguf FILE.gguf] [--batch 1] [--rounds 6] [--new-tokens 128] [--json out/kernel_ab.json]

Both libraries are built from their own sources (the base's from ``git show BASE:adaroute/kernels/csrc/…``)
and loaded side by side. Each round runs every engine once on the base library and once on the current
one, alternating (an engine is built while its library is the one in use, and every kernel call of a
round goes to that library); with ``--gguf`` llama.cpp runs on that file in the same rounds as a fixed
reference. The table gives medians over the rounds after the first (a warm-up) and the median of each
round's current/base ratio, which a machine shared with other jobs still measures fairly. ``dense`` is the
engine with every FFN dense on the model's weights as loaded (for a routed model: its dense arm, the
unit-packed path), ``routed`` the routed engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from adaroute import load_model
from adaroute.cli.common import thread_count
from adaroute.eval.bench import bench_prompts, llama_cpp_engine, runtime_engine
from adaroute.kernels import cpu
from adaroute.runtime.formats import runtime_weights

REPO = Path(__file__).resolve().parents[1]


def base_sources(rev: str, into: Path) -> Path:
    """The kernel sources at git revision ``rev``, written into ``into``."""
    for path in [*cpu.SOURCES, cpu.CSRC / "common.h", cpu.CSRC / "step.h"]:
        rel = path.relative_to(REPO).as_posix()
        done = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{rel}"], capture_output=True)
        if done.returncode:
            raise SystemExit(f"kernel_ab: {rel} is not in revision {rev}: {done.stderr.decode().strip()}")
        (into / path.name).write_bytes(done.stdout)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--base", default="HEAD", help="git revision whose kernel sources are the baseline")
    ap.add_argument("--engines", default="dense,routed", help="dense, routed or both (routed needs a routed model)")
    ap.add_argument("--weights", default="f32", help="weight format the engines run at (f32, q8, q4)")
    ap.add_argument("--gguf", help="also run llama.cpp on this GGUF file as a reference")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (llama.cpp: batch 1 only)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default="out/kernel_ab.json")
    args = ap.parse_args()
    if args.gguf and args.batch != 1:
        raise SystemExit("kernel_ab: llama.cpp runs one sequence at a time (drop --gguf or --batch)")
    torch.set_num_threads(thread_count())
    model, tokenizer = load_model(args.model)
    w = runtime_weights(model, args.weights)
    kinds = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": cpu.load_kernels(base_sources(args.base, Path(tmp))), "current": cpu.load_kernels()}
    engines = {}
    for lib_name, lib in libs.items():
        cpu._lib = lambda lib=lib: lib  # every kernel call, and the engines' fused steps, go to this library
        for kind in kinds:
            engines[f"{kind} {lib_name}"] = (lib, runtime_engine(None, kind == "routed", weights=w))
    prompts = bench_prompts(tokenizer, args.batch, 64)
    llama = llama_cpp_engine(args.gguf, torch.get_num_threads(), 64 + args.new_tokens) if args.gguf else None
    if args.gguf and llama is None:
        raise SystemExit("kernel_ab: --gguf needs llama_cpp (pip install -e .[llamacpp])")
    rates: dict[str, list[float]] = {name: [] for name in [*engines, *(["llama.cpp"] if llama else [])]}
    for _ in range(args.rounds):
        for name, (lib, engine) in engines.items():
            cpu._lib = lambda lib=lib: lib
            run = engine.generate(prompts, args.new_tokens)
            rates[name].append(args.batch * len(run.step_s) / sum(run.step_s))
        if llama:
            run = llama.generate(prompts, args.new_tokens)
            rates["llama.cpp"].append(len(run.step_s) / sum(run.step_s))
    median = {name: statistics.median(v[1:] or v) for name, v in rates.items()}
    print(f"{'engine':<18} {'tok/s':>7}  rounds")
    for name, v in rates.items():
        print(f"{name:<18} {median[name]:7.1f}  {[round(x, 1) for x in v]}")
    ratios = {}
    for kind in kinds:
        per_round = [c / b for c, b in zip(rates[f"{kind} current"], rates[f"{kind} base"], strict=True)][1:]
        ratios[f"{kind} current/base"] = statistics.median(per_round or [float("nan")])
        if llama:
            for lib_name in libs:
                per = [a / b for a, b in zip(rates[f"{kind} {lib_name}"], rates["llama.cpp"], strict=True)][1:]
                ratios[f"{kind} {lib_name}/llama.cpp"] = statistics.median(per or [float("nan")])
    for name, r in ratios.items():
        print(f"{name:<28} {r:.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "base": args.base, "weights": args.weights, "batch": args.batch,
                               "rates": rates, "median": median, "ratios": ratios,
                               "threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
