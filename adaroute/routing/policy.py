"""Selection policy: which units a token computes, and how thresholds are calibrated.

Shape legend: T = tokens, F = FFN units, L = routed layers, D = densities on a grid.

Adaptive policy: unit i runs for token t iff score[t, i] >= threshold (per layer), then guards:
fewer than ``min_units`` pass -> take the top ``min_units``; more than ``max_units`` -> keep the top
``max_units``. The number of units therefore varies per token.
Fixed top-k baseline: the same mechanism with threshold = +inf and min_units = max_units = k.
Dense: threshold = -inf and max_units = F selects every unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaroute.kernels.reference import select_units  # the policy's one definition


@dataclass(frozen=True)
class LayerPolicy:
    """One layer's selection rule."""

    threshold: float
    min_units: int
    max_units: int

    @classmethod
    def dense(cls, units: int) -> LayerPolicy:
        return cls(-math.inf, 0, units)

    @classmethod
    def topk(cls, k: int) -> LayerPolicy:
        return cls(math.inf, k, k)


class HoldsPolicy:
    """A layer's current selection rule as three attributes (what the runtime reads at call time)."""

    threshold: float
    min_units: int
    max_units: int

    @property
    def policy(self) -> LayerPolicy:
        return LayerPolicy(self.threshold, self.min_units, self.max_units)

    def set_policy(self, policy: LayerPolicy) -> None:
        self.threshold, self.min_units, self.max_units = float(policy.threshold), policy.min_units, policy.max_units


class UnitPolicy(HoldsPolicy):
    """A routed layer's selection state without its weights: policy, calibration profile, size.

    What the runtime reads of a ``RoutedMLP`` (``threshold``, ``min_units``, ``max_units``,
    ``profile``, ``set_policy``), for engines built straight from a checkpoint
    (``adaroute.runtime.checkpoint``) with no module to hold it."""

    def __init__(self, layer_idx: int, units: int, policy: LayerPolicy, profile=None):
        self.layer_idx, self.units, self.profile = layer_idx, units, profile
        self.set_policy(policy)


def guard_units(units: int, min_density: float, max_density: float) -> tuple[int, int]:
    """Per-token guards in units for a layer of ``units`` FFN units."""
    lo = min(units, max(1, math.ceil(min_density * units))) if min_density > 0 else 0
    hi = max(lo, min(units, math.floor(max_density * units)))
    return lo, hi


def realised_density(scores: torch.Tensor, threshold: float, min_units: int, max_units: int) -> float:
    """Mean share of units selected over the tokens of ``scores`` [T, F]."""
    return select_units(scores, threshold, min_units, max_units).float().mean().item()


def calibrate_threshold(scores: torch.Tensor, density: float, min_units: int, max_units: int) -> float:
    """Threshold whose guarded selection on ``scores`` [T, F] has mean density ``density``."""
    return calibrate_thresholds(scores, [density], min_units, max_units)[0]


_EXACT_LIMIT = 1 << 21


def calibrate_thresholds(scores: torch.Tensor, densities: list[float], min_units: int, max_units: int) -> list[float]:
    """One threshold per target density, guards included, exactly and with one sort.

    With each token's units ranked by score, a token always gets its ``min_units`` best units and
    never more than ``max_units``, so the guarded count at threshold th is
    ``min_units + #{units ranked in [min_units, max_units) with score >= th}``. The threshold for a
    target total is therefore an order statistic of the scores ranked in that band.
    Densities >= 1 give -inf; a target below the guard floor gives +inf (the floor alone).
    Bands over ``_EXACT_LIMIT`` entries are read from an evenly strided sample, which keeps the sort
    small; the density error is then ~sqrt(d (1 - d) / limit) < 1e-3.
    """
    band = _guard_band(scores.detach().float(), min_units, max_units)  # [T * (hi - lo)]
    stride = max(1, math.ceil(band.numel() / _EXACT_LIMIT))
    band = band[::stride].sort(descending=True).values
    tokens, units = scores.shape
    out = []
    for d in densities:
        extra = round(d * tokens * units) - tokens * min_units  # units wanted beyond the floor
        if d >= 1.0:
            out.append(-math.inf)
        elif extra <= 0:
            out.append(math.inf)
        else:
            out.append(float(band[min(math.ceil(extra / stride), band.numel()) - 1]))
    return out


def _guard_band(scores: torch.Tensor, min_units: int, max_units: int) -> torch.Tensor:
    """Scores ranked in [min_units, max_units) within their token, flattened (order not kept)."""
    tokens, units = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)  # [T, F]
    if min_units > 0:
        keep.scatter_(1, scores.topk(min_units, dim=-1).indices, False)
    if max_units < units:
        keep.scatter_(1, scores.topk(units - max_units, dim=-1, largest=False).indices, False)
    return scores[keep]


def allocate_densities(
    grid: torch.Tensor, cost: torch.Tensor, target: float, lo: float, hi: float
) -> list[float]:
    """Spread a mean density ``target`` over layers to minimise the summed measured cost.

    grid [D] ascending densities (must include values <= lo and >= hi); cost [L, D] the measured
    loss increase of each layer routed alone at each grid density. Each layer's cost curve is
    made convex (lower hull) and interpolated linearly, then density is handed out greedily to the
    layer with the steepest cost decrease per unit of density (optimal for separable convex costs).
    Returns a density per layer, mean == target (up to float rounding).
    """
    layers = cost.shape[0]
    curves = [_convex_curve(grid, cost[l], lo, hi) for l in range(layers)]
    dens = [lo] * layers
    budget = target * layers - lo * layers
    # Each curve is a list of (density, cost) breakpoints; walk segments in order of slope.
    segs = []
    for l, pts in enumerate(curves):
        for (d0, c0), (d1, c1) in zip(pts[:-1], pts[1:], strict=True):
            segs.append(((c1 - c0) / (d1 - d0), l, d1 - d0))
    segs.sort(key=lambda s: (s[0], s[1]))  # most negative slope (biggest gain) first
    for _, l, width in segs:
        take = min(width, budget)
        dens[l] += take
        budget -= take
        if budget <= 1e-12:
            break
    return dens


def _convex_curve(grid: torch.Tensor, cost: torch.Tensor, lo: float, hi: float) -> list[tuple[float, float]]:
    """Lower convex hull of (density, cost) restricted to [lo, hi], cost made non-increasing."""
    pts = [(float(lo), _interp(grid, cost, lo))]
    pts += [(float(d), float(c)) for d, c in zip(grid.tolist(), cost.tolist(), strict=True) if lo < d < hi]
    pts.append((float(hi), _interp(grid, cost, hi)))
    # Measured costs are noisy; more density must never be predicted to hurt.
    for i in range(len(pts) - 2, -1, -1):
        pts[i] = (pts[i][0], max(pts[i][1], pts[i + 1][1]))
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _interp(grid: torch.Tensor, cost: torch.Tensor, d: float) -> float:
    g, c = grid.tolist(), cost.tolist()
    if d <= g[0]:
        return c[0]
    for i in range(1, len(g)):
        if d <= g[i]:
            w = (d - g[i - 1]) / (g[i] - g[i - 1])
            return c[i - 1] * (1 - w) + c[i] * w
    return c[-1]
