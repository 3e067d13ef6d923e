"""Quality of a routed model against its own dense base, on the same windows.

The dense reference is the same model with every routed layer set to the dense policy, which is
bit-identical to the original FFNs, so a routed directory needs no second copy of the base model.

Cost (bytes and FLOPs per token as shares of the dense FFN, router and adapter included) is counted
by ``adaroute.runtime.cost`` on the weights as the runtime holds them, in the model's own format.
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
from adaroute.routing.stats import Collector, LayerCounts, RoutingStats, Tee, collecting
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


def cost_shares(routed_model: nn.Module, mods: list[RoutedMLP], layer_density: dict[int, float],
                weights=None) -> dict[str, float]:
    """FFN bytes and FLOPs per token as shares of the dense FFN (``adaroute.runtime.cost.ffn_shares``)
    of ``weights`` (``ModelWeights``; default: the model's own, in the format it is stored in), each
    routed layer at its density, layers at the dense policy dense."""
    from adaroute.runtime.cost import ffn_shares
    from adaroute.runtime.formats import runtime_weights

    weights = weights if weights is not None else runtime_weights(routed_model, None, max_positions=1)
    return ffn_shares(weights, {m.layer_idx: layer_density[m.layer_idx] for m in mods},
                      {m.layer_idx for m in mods if m.is_dense})


def compare_with_dense(
    routed_model: nn.Module,
    tokenizer,
    text: str,
    window: int = 512,
    max_tokens: int | None = None,
    density: float | None = None,
    desc: str = "",
    collector: Collector | None = None,
    cost: bool = True,
    start: bool = True,
) -> dict[str, Any]:
    """Routed vs dense on the same non-overlapping windows of ``text``.

    ``density`` overrides the converted density (re-allocated over layers from the stored
    sensitivities) for quick sweeps; the model's policies are restored afterwards.
    ``collector``, when given, also receives every routed forward (e.g. to keep the selection masks).
    ``cost`` False leaves out the cost shares (for routers the runtime cannot run: the hindsight oracle).
    ``start``: windows begin with the model's start token (``adaroute.eval.perplexity``'s protocol).
    Returns perplexities and their ratio, top-1 next-token agreement, KL(dense || routed) per token,
    per-layer and mean density, cost shares, the units-per-token distribution and, per window, the
    summed NLLs, agreements, scored tokens and density (for intervals over windows).
    """
    from adaroute.eval.perplexity import text_windows

    mods = routed_modules(routed_model)
    wins = text_windows(tokenizer, text, window, max_tokens, start)
    saved = [m.policy for m in mods]
    try:
        if density is not None:
            apply_density(mods, density)
        sums, stats = _score_windows(routed_model, mods, wins, desc, collector)
        result = _result(sums, stats, mods, len(wins), density)
        if cost:  # of the evaluated policies
            result |= cost_shares(routed_model, mods, _by_layer(mods, result))
        return result
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
        win = _add_window(sums, dense, routed, w[0, 1:])
        now_used, now_slots = stats.totals()
        # a window whose routed layers all ran dense reports no selections: density 1
        win["density"] = (now_used - used) / (now_slots - slots) if now_slots > slots else 1.0
        sums["per_window"].append(win)
    return sums, stats


def _add_window(sums: dict, dense: torch.Tensor, routed: torch.Tensor, target: torch.Tensor) -> dict:
    """Add one window's NLLs, agreement and KL to ``sums``, from dense and routed logits [W-1, V] and
    the next tokens [W-1]; returns the window's own record (without its density)."""
    win = {"nll_dense": F.cross_entropy(dense, target, reduction="sum").item(),
           "nll_routed": F.cross_entropy(routed, target, reduction="sum").item(),
           "agree": (dense.argmax(-1) == routed.argmax(-1)).sum().item(), "tokens": target.numel()}
    logp_d, logp_r = F.log_softmax(dense, -1), F.log_softmax(routed, -1)
    sums["kl"] += (logp_d.exp() * (logp_d - logp_r)).sum().item()
    for key, value in win.items():
        sums[key] += value
    return win


def compare_with_dense_runtime(
    weights,
    routed_model: nn.Module,
    tokenizer,
    text: str,
    window: int = 512,
    max_tokens: int | None = None,
    density: float | None = None,
    desc: str = "",
    kernel: str | None = None,
    start: bool = True,
) -> dict[str, Any]:
    """``compare_with_dense`` computed by the runtime engine on ``weights`` (``ModelWeights`` of
    ``routed_model`` at any format, ``adaroute.runtime.formats.runtime_weights``): the same windows,
    keys and meanings, dense = every FFN unit of the same weights, routed = every token of every window
    sparse, as the routed model computes it (the runtime's per-token dense fail-safe is off, so the
    numbers are the router's own selections). The policies are those the weights' routed modules hold
    (set a density with ``apply_density`` before building the weights; ``density`` is only recorded).
    Byte and FLOP shares are of the weights as held (block bytes at q8/q4), as ``cost_shares``.
    """
    from adaroute.eval.perplexity import text_windows
    from adaroute.runtime import Engine, ExecutionPolicy
    from adaroute.runtime.weights import RoutedFFN

    mods = routed_modules(routed_model)
    wins = text_windows(tokenizer, text, window, max_tokens, start)
    dense_engine = Engine(weights, kernel=kernel, policy=ExecutionPolicy.always_dense())
    engine = Engine(weights, kernel=kernel, policy=ExecutionPolicy.always_sparse())
    engine.failsafe = None
    engine.record_units = True
    usage = engine.start_unit_usage()  # [L, F]
    routed_layers = {i: ly.ffn.w_gate.shape[0] for i, ly in enumerate(weights.layers) if isinstance(ly.ffn, RoutedFFN)}
    hist = {i: torch.zeros(f + 1, dtype=torch.long) for i, f in routed_layers.items()}  # units per token
    tokens = dict.fromkeys(routed_layers, 0)
    sums = {"nll_dense": 0.0, "nll_routed": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0, "per_window": []}
    with torch.inference_mode():
        for w in tqdm(wins, desc=desc or "routed vs dense", unit="win", leave=False):
            d = dense_engine.forward(w, dense_engine.new_cache(1, w.shape[1]), all_logits=True)[0, :-1].float()
            r = engine.forward(w, engine.new_cache(1, w.shape[1]), all_logits=True)[0, :-1].float()
            win = _add_window(sums, d, r, w[0, 1:])
            used = slots = 0
            for i, units in routed_layers.items():
                counts = engine.last_units[i].cpu()  # [W], -1 when the layer ran dense
                if bool((counts >= 0).all()):
                    hist[i] += torch.bincount(counts, minlength=units + 1)
                    tokens[i] += counts.numel()
                    used, slots = used + int(counts.sum()), slots + counts.numel() * units
            win["density"] = used / slots if slots else 1.0  # as compare_with_dense: no selections, density 1
            sums["per_window"].append(win)
    stats = RoutingStats()
    for i, units in routed_layers.items():
        if tokens[i]:
            stats.layers[i] = LayerCounts(units, tokens[i], hist[i], usage[i, :units].clone())
    result = _result(sums, stats, mods, len(wins), density)
    return result | cost_shares(routed_model, mods, _by_layer(mods, result), weights)


def _by_layer(mods: list[RoutedMLP], result: dict) -> dict[int, float]:
    return dict(zip((m.layer_idx for m in mods), result["layer_density"], strict=True))


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
        "units_per_token": stats.units_per_token() if stats.layers else {},
        "unit_usage": stats.unit_usage_summary() if stats.layers else {},
        "density_override": density,
        "per_window": sums["per_window"],
        "window_spread": window_spread(sums["per_window"]),
        "tokens": n,
        "windows": n_windows,
    }


def window_spread(per_window: list[dict]) -> dict[str, Any]:
    """How evenly a file's extra loss is spread over its windows, from per-window records
    (``nll_dense``, ``nll_routed``, ``tokens``): the per-window ratios' range, the window with the most
    extra NLL (routed - dense; 0-based), its share of the file's extra NLL (None unless that is
    positive) and the ratio over the other windows (None with one window). One window holding most of
    the excess (a page of markup in prose, say) is then visible instead of hidden in the file's ratio.
    The range leaves out a trailing remainder under half the longest window's tokens: a ratio over a
    few tokens says nothing about the file."""
    excess = [w["nll_routed"] - w["nll_dense"] for w in per_window]
    longest = max(w["tokens"] for w in per_window)
    ratios = [math.exp(e / w["tokens"]) for e, w in zip(excess, per_window, strict=True) if 2 * w["tokens"] >= longest]
    worst = max(range(len(excess)), key=excess.__getitem__)
    total, rest = sum(excess), sum(w["tokens"] for i, w in enumerate(per_window) if i != worst)
    return {"ratio_min": min(ratios), "ratio_max": max(ratios), "worst_window": worst,
            "worst_excess_share": excess[worst] / total if total > 0 else None,
            "ratio_without_worst": math.exp((total - excess[worst]) / rest) if rest else None}
