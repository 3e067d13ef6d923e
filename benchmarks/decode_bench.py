"""Decode speed of the embedded model: transformers eager, adaroute dense, adaroute routed at
several densities, interleaved in one process. Prints a table (with each routed engine's share of
the speedup its weight bytes allow) and writes JSON.

    python benchmarks/decode_bench.py [--densities 0.5,0.35] [--threads 2] [--json out.json]

Routed engines use the untrained router (int4 shadow + log-norm bias) with per-layer thresholds
calibrated on real hidden states, which is enough for speed: kernel cost depends on how many
units are selected, not on which.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict

import torch

from adaroute.eval.bench import bench_prompts, build_engines, format_table, run_engines, runtime_engine


def calibrated_copy(model, tokenizer, density: float, tokens: int = 512):
    """A routed copy of ``model`` whose thresholds give ``density`` on Python documentation text."""
    from pydoc_data.topics import topics

    from adaroute.routing import LayerPolicy, calibrate_threshold, route_model
    from adaroute.routing.policy import guard_units

    routed = copy.deepcopy(model)
    mods = route_model(routed)
    text = topics["for"] + topics["while"] + topics["try"]
    ids = torch.tensor([tokenizer(text).input_ids[:tokens]], device=model.device)
    seen = {m: [] for m in mods}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen[mod].append(args[0].reshape(-1, mod.hidden)))
             for m in mods]
    with torch.no_grad():
        routed(ids)
    for h in hooks:
        h.remove()
    for m in mods:
        lo, hi = guard_units(m.units, 0.05, 0.95)
        with torch.no_grad():
            th = calibrate_threshold(m.router.score(torch.cat(seen[m])), density, lo, hi)
        m.set_policy(LayerPolicy(th, lo, hi))
    return routed


def unit_packed_copy(routed):
    """A copy of a routed model whose routed layers keep gate, up and down in one [F, 3, H] store
    (each a strided view of it), so that a selected unit is one contiguous read."""
    from adaroute.kernels import reference

    packed = copy.deepcopy(routed)
    for m in packed.modules():
        if not hasattr(m, "w_down_t") or not hasattr(m, "router"):
            continue
        if not reference.is_unit_packed(m.w_gate, m.w_up, m.w_down_t):
            views = reference.unit_views(reference.pack_units(m.w_gate.data, m.w_up.data, m.w_down_t.data))
            for name, view in zip(("w_gate", "w_up", "w_down_t"), views, strict=True):
                m._parameters.pop(name, None)  # stand-in for a module that owns one w_units tensor
                setattr(m, name, view)
    return packed


def adapted_copy(routed, rank: int):
    """A copy of a routed model with rank-``rank`` routing adapters holding random non-zero weights:
    an adapter leaves the selection unchanged (it does not touch the router's input), so its cost is
    the same whatever it learned."""
    from adaroute.routing import routed_modules

    adapted = copy.deepcopy(routed)
    g = torch.Generator().manual_seed(0)
    for m in routed_modules(adapted):
        if not m.is_dense:
            a = m.add_adapter(rank, g)
            with torch.no_grad():
                for p in a.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return adapted


def speedup_summary(records) -> list[str]:
    lines = []
    for r in records:
        if not r.engine.startswith("adaroute-routed") or not r.ideal_vs_dense or r.density is None:
            continue
        got, ideal = r.vs_dense, r.ideal_vs_dense
        lines.append(f"{r.engine} batch {r.batch}: density {r.density:.3f}, speedup {got:.2f}x of ideal "
                     f"{ideal:.2f}x by bytes -> {100 * (got - 1) / (ideal - 1):.0f}% of the ideal gain, "
                     f"{100 * got / ideal:.0f}% of the ideal speed")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--densities", default="0.5,0.35")
    p.add_argument("--batch", default="1")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--unit-packed", action="store_true",
                   help="also run each routed model with unit-packed [F, 3, H] weights")
    p.add_argument("--adapt-rank", type=int, default=0,
                   help="also run each routed model with routing adapters of this rank")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU path: PyTorch + Triton kernels)")
    p.add_argument("--json")
    args = p.parse_args()
    from adaroute.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model = model.to(args.device)
    routed = {f"{float(d)}": calibrated_copy(model, tokenizer, float(d)) for d in args.densities.split(",") if d}
    if args.unit_packed:
        routed.update({f"{d}-packed": unit_packed_copy(m) for d, m in list(routed.items())})
    if args.adapt_rank:
        routed.update({f"{d}+adapters-r{args.adapt_rank}": adapted_copy(m, args.adapt_rank)
                       for d, m in list(routed.items())})
    records = []
    for batch in [int(b) for b in args.batch.split(",")]:
        engines = build_engines(model)[(1 if args.no_hf else 0):]
        engines += [runtime_engine(m, routed=True, name=f"adaroute-routed@{d}") for d, m in routed.items()]
        prompts = bench_prompts(tokenizer, batch, args.prompt_tokens)
        records += run_engines(engines, prompts, args.new_tokens, args.repeats, progress=print)
    print(f"device: {args.device}  threads: {torch.get_num_threads()}")
    print(format_table(records))
    print("\n".join(speedup_summary(records)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": torch.get_num_threads(),
                       "records": [asdict(r) for r in records]}, f, indent=2)


if __name__ == "__main__":
    main()
