"""Collectors that routed modules report to: explicit objects, never module globals.

Shape legend: T = tokens, F = FFN units.

A ``RoutedMLP`` whose ``collector`` attribute is set calls ``collector.record(layer, scores, mask,
soft)`` on every forward. ``RoutingStats`` keeps detached counts (units per token, unit usage);
``ScoreTape`` keeps the tensors themselves, graph attached, so training can compute router losses
once at the top.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from adaroute.routing.routed_mlp import RoutedMLP


def unit_use(counts: torch.Tensor, tokens: int) -> torch.Tensor:
    """Unit use [..., F]: the share of ``tokens`` tokens that selected each unit, from selection counts
    [..., F] (0 = never, 1 = every token)."""
    return counts.double() / tokens


def use_imbalance(counts: torch.Tensor) -> torch.Tensor:
    """Max over mean unit use per layer, from selection counts [..., F] -> [...]: 1 when every unit is
    used equally, F when one unit does all the work; NaN where nothing was selected (nothing to measure).
    The token count cancels, so counts over any number of tokens compare."""
    use = unit_use(counts, 1)
    return use.amax(-1) / use.mean(-1)


class Collector(Protocol):
    def record(
        self, layer: int, scores: torch.Tensor | None, mask: torch.Tensor, soft: torch.Tensor | None
    ) -> None: ...


@dataclass
class LayerCounts:
    units: int
    tokens: int = 0
    per_token: torch.Tensor | None = None  # [F + 1] histogram of units selected per token
    usage: torch.Tensor | None = None  # [F] tokens that selected each unit

    def add(self, mask: torch.Tensor) -> None:
        count = mask.sum(dim=-1)  # [T]
        hist = torch.bincount(count, minlength=self.units + 1)
        usage = mask.sum(dim=0)  # [F]
        self.per_token = hist if self.per_token is None else self.per_token + hist
        self.usage = usage if self.usage is None else self.usage + usage
        self.tokens += mask.shape[0]

    def density(self) -> float:
        return float((self.usage.sum() / (self.tokens * self.units)).item()) if self.tokens else float("nan")


@dataclass
class RoutingStats:
    """Detached per-layer counts: density, units per token, unit usage."""

    layers: dict[int, LayerCounts] = field(default_factory=dict)

    def record(self, layer, scores, mask, soft=None) -> None:
        mask = mask.detach().reshape(-1, mask.shape[-1])
        self.layers.setdefault(layer, LayerCounts(mask.shape[-1])).add(mask)

    def layer_density(self) -> dict[int, float]:
        return {l: c.density() for l, c in sorted(self.layers.items())}

    def mean_density(self) -> float:
        """Unit-weighted mean density over layers (the share of FFN work executed)."""
        used, slots = self.totals()
        return used / slots if slots else float("nan")

    def totals(self) -> tuple[float, int]:
        """(units selected, token x unit slots) summed over layers: their ratio is the mean density."""
        used = sum(float(c.usage.sum()) for c in self.layers.values())
        return used, sum(c.units * c.tokens for c in self.layers.values())

    def units_per_token(self) -> dict[str, float]:
        """Distribution of (units selected / F) per token per layer, pooled over layers."""
        shares, weights = [], []
        for c in self.layers.values():
            shares.append(torch.arange(c.units + 1, dtype=torch.float64) / c.units)
            weights.append(c.per_token.double())
        return _summarise(torch.cat(shares), torch.cat(weights))

    def unit_usage_summary(self) -> dict[str, float]:
        """How many units are never / always selected (dead / saturated), pooled over layers."""
        never = sum(int((c.usage == 0).sum()) for c in self.layers.values())
        always = sum(int((c.usage == c.tokens).sum()) for c in self.layers.values())
        total = sum(c.units for c in self.layers.values())
        return {"never_used": never / total, "always_used": always / total}


def _summarise(values: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    order = torch.argsort(values)
    v, w = values[order], weights[order]
    cdf = torch.cumsum(w, 0) / w.sum()
    mean = float((v * w).sum() / w.sum())
    std = float(((v - mean) ** 2 * w).sum().div(w.sum()).sqrt())
    out = {"mean": mean, "std": std}
    for p in (0.01, 0.1, 0.5, 0.9, 0.99):
        out[f"p{int(p * 100)}"] = float(v[torch.searchsorted(cdf, torch.tensor(p, dtype=cdf.dtype))])
    out["min"] = float(v[(w > 0).nonzero()[0]])
    out["max"] = float(v[(w > 0).nonzero()[-1]])
    return out


@dataclass
class MaskTape:
    """Keeps the selection masks themselves (detached, bool) per layer, for the first ``max_tokens``
    tokens: what statistics over sets of tokens need (unions across tokens, totals across layers).
    Every layer sees the same tokens, so row t of each layer's mask is the same token."""

    max_tokens: int
    parts: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def record(self, layer, scores, mask, soft=None) -> None:
        kept = sum(p.shape[0] for p in self.parts.get(layer, []))
        room = self.max_tokens - kept
        if room > 0:
            self.parts.setdefault(layer, []).append(mask.detach().reshape(-1, mask.shape[-1])[:room].bool().clone())

    def masks(self) -> dict[int, torch.Tensor]:
        """{layer: [T, F] bool}, layers in order."""
        return {l: torch.cat(p) for l, p in sorted(self.parts.items())}


@dataclass(frozen=True)
class Tee:
    """Hands every record to each of several collectors (one attachment point, many observers)."""

    collectors: tuple[Collector, ...]

    def record(self, layer, scores, mask, soft=None) -> None:
        for c in self.collectors:
            c.record(layer, scores, mask, soft)


@dataclass
class ScoreTape:
    """Keeps (layer, scores, hard mask, soft mask) of every routed forward, graph attached."""

    entries: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    def record(self, layer, scores, mask, soft=None) -> None:
        self.entries.append((layer, scores, mask, soft))

    def clear(self) -> None:
        self.entries.clear()


@contextmanager
def collecting(model: nn.Module, collector: Collector) -> Iterator[Collector]:
    """Attach ``collector`` to every routed module of ``model`` for the duration of the block."""
    mods = [m for m in model.modules() if isinstance(m, RoutedMLP)]
    previous = [m.collector for m in mods]
    for m in mods:
        m.collector = collector
    try:
        yield collector
    finally:
        for m, p in zip(mods, previous, strict=True):
            m.collector = p
