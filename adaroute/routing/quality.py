"""Quality of a routed model against its own dense base, on the same windows.

The dense reference is the same model with every routed layer set to the dense policy, which is
bit-identical to the original FFNs, so a routed directory needs no second copy of the base model.

Cost accounting (per token, FFN only, as a share of the dense FFN):
    bytes  = sum_l [d_l * 3 F H * w + router_bytes_l] / sum_l 3 F H * w     (w = weight element size)
    flops  = sum_l [d_l * 6 F H + 4 F H] / sum_l 6 F H                       (router: the 2F x H shadow)
plus, for a layer with a routing adapter of rank r, 3 r H + d_l 3 F r elements
(``RoutingAdapter.weight_bytes``) in bytes and twice that in FLOPs. A layer at the dense policy runs
no router and no adapter. Decode on CPUs and GPUs is bound by bytes read, which is why the router
is an int4 shadow: it reads ~10 % of the FFN's bytes but does 2/3 of its multiply-adds, so prefill
(compute-bound) should run dense.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adaroute.routing.policy import LayerPolicy
from adaroute.routing.profile import apply_density
from adaroute.routing.routed_mlp import RoutedMLP
from adaroute.routing.stats import Collector, RoutingStats, Tee, collecting
from adaroute.routing.surgery import routed_modules


@contextmanager
def dense_policies(mods: list[RoutedMLP]) -> Iterator[None]:
    """Temporarily run every routed layer densely (the base model's exact computation)."""
    saved = [m.policy for m in mods]
    for m in mods:
        m.set_policy(LayerPolicy.dense(m.units))
    try:
        yield
    finally:
        for m, p in zip(mods, saved, strict=True):
            m.set_policy(p)


def cost_shares(mods: list[RoutedMLP], layer_density: dict[int, float]) -> dict[str, float]:
    """Bytes and FLOPs per token as shares of the dense FFN, router included (see module doc)."""
    dense_bytes = dense_flops = bytes_ = flops = router_bytes = adapter_bytes = 0.0
    for m in mods:
        w = m.w_gate.element_size()
        d = layer_density.get(m.layer_idx, 1.0)
        dense_bytes += 3 * m.units * m.hidden * w
        dense_flops += 6 * m.units * m.hidden
        bytes_ += d * 3 * m.units * m.hidden * w
        flops += d * 6 * m.units * m.hidden
        if not m.is_dense:
            router_bytes += m.router.weight_bytes()
            flops += 4 * m.units * m.hidden
            if m.adapter is not None:
                adapter_bytes += m.adapter.weight_bytes(d)
                flops += 2 * m.adapter.weight_bytes(d) / m.adapter.w_in.element_size()
    return {
        "ffn_bytes_share": (bytes_ + router_bytes + adapter_bytes) / dense_bytes,
        "router_bytes_share": router_bytes / dense_bytes,
        "adapter_bytes_share": adapter_bytes / dense_bytes,
        "ffn_flops_share": flops / dense_flops,
    }


def compare_with_dense(
    routed_model: nn.Module,
    tokenizer,
    text: str,
    window: int = 512,
    max_tokens: int | None = None,
    density: float | None = None,
    desc: str = "",
    collector: Collector | None = None,
) -> dict[str, Any]:
    """Routed vs dense on the same non-overlapping windows of ``text``.

    ``density`` overrides the converted density (re-allocated over layers from the stored
    sensitivities) for quick sweeps; the model's policies are restored afterwards.
    ``collector``, when given, also receives every routed forward (e.g. to keep the selection masks).
    Returns perplexities and their ratio, top-1 next-token agreement, KL(dense || routed) per token,
    per-layer and mean density, cost shares, the units-per-token distribution and, per window, the
    summed NLLs, agreements, scored tokens and density (for intervals over windows).
    """
    from adaroute.eval.perplexity import tokenize, windows

    mods = routed_modules(routed_model)
    wins = windows(tokenize(tokenizer, text, max_tokens), window)
    saved = [m.policy for m in mods]
    try:
        if density is not None:
            apply_density(mods, density)
        sums, stats = _score_windows(routed_model, mods, wins, desc, collector)
        return _result(sums, stats, mods, len(wins), density)  # while the evaluated policies are set
    finally:
        for m, p in zip(mods, saved, strict=True):
            m.set_policy(p)


@torch.inference_mode()
def _score_windows(model: nn.Module, mods: list[RoutedMLP], wins: list[torch.Tensor], desc: str,
                   collector: Collector | None = None):
    sums = {"nll_dense": 0.0, "nll_routed": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0, "per_window": []}
    stats = RoutingStats()
    sink = stats if collector is None else Tee((stats, collector))
    for w in tqdm(wins, desc=desc or "routed vs dense", unit="win", leave=False):
        with dense_policies(mods):
            dense = model(input_ids=w, use_cache=False).logits[0, :-1].float()  # [W-1, V]
        used, slots = stats.totals()
        with collecting(model, sink):
            routed = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        target = w[0, 1:]
        win = {"nll_dense": F.cross_entropy(dense, target, reduction="sum").item(),
               "nll_routed": F.cross_entropy(routed, target, reduction="sum").item(),
               "agree": (dense.argmax(-1) == routed.argmax(-1)).sum().item(), "tokens": target.numel()}
        logp_d, logp_r = F.log_softmax(dense, -1), F.log_softmax(routed, -1)
        sums["kl"] += (logp_d.exp() * (logp_d - logp_r)).sum().item()
        for key, value in win.items():
            sums[key] += value
        now_used, now_slots = stats.totals()
        # a window whose routed layers all ran dense reports no selections: density 1
        win["density"] = (now_used - used) / (now_slots - slots) if now_slots > slots else 1.0
        sums["per_window"].append(win)
    return sums, stats


def _result(sums: dict, stats: RoutingStats, mods: list[RoutedMLP], n_windows: int, density) -> dict[str, Any]:
    n = sums["tokens"]
    ppl_d, ppl_r = math.exp(sums["nll_dense"] / n), math.exp(sums["nll_routed"] / n)
    layer_density = {m.layer_idx: 1.0 for m in mods if m.is_dense} | stats.layer_density()
    return {
        "perplexity_dense": ppl_d,
        "perplexity_routed": ppl_r,
        "perplexity_ratio": ppl_r / ppl_d,
        "top1_agreement": sums["agree"] / n,
        "kl_per_token": sums["kl"] / n,
        "mean_density": sum(layer_density.values()) / len(layer_density),
        "layer_density": [layer_density[m.layer_idx] for m in mods],
        **cost_shares(mods, layer_density),
        "units_per_token": stats.units_per_token() if stats.layers else {},
        "unit_usage": stats.unit_usage_summary() if stats.layers else {},
        "density_override": density,
        "per_window": sums["per_window"],
        "tokens": n,
        "windows": n_windows,
    }
