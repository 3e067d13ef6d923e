"""Per-layer calibration profile, and the density override built on it.

A profile records, for one routed layer, the thresholds that hit each density of a grid on the
calibration data and the layer's measured sensitivity (estimated KL) at those densities. With it a
routed model can be moved to another mean density without calibration data: densities are
re-allocated over layers from the stored sensitivities and thresholds are interpolated.

It also records the layer's operating band: the units per token its calibrated selection keeps
within (the runtime's fail-safe computes a token densely when its selection leaves the band).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from adaroute.routing.policy import LayerPolicy, allocate_densities

PROFILE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
# Band = (p0.1, p99.9) of units per token on the calibration tokens, widened by these factors, so
# that only selections rarer than one token in a thousand, and clearly so, leave it.
BAND_QUANTILES = (0.001, 0.999)
BAND_WIDEN = (0.8, 1.25)
# Directories written before the band was stored: a wide band around the layer's density (on the
# embedded model the pooled p1 / p99 of units per token sit at 0.36x / 1.4x the mean density).
LEGACY_BAND = (0.2, 2.5)


@dataclass
class LayerProfile:
    grid: list[float]  # ascending densities
    thresholds: list[float]  # adaptive threshold hitting each grid density (-inf at 1.0)
    cost: list[float]  # estimated KL per token when this layer alone runs at each grid density
    density: float  # density allocated to this layer at conversion
    policy: str  # "adaptive" or "topk"
    min_units: int  # per-token guards
    max_units: int
    units_band: list[int] | None = None  # [lo, hi] units per token at ``density`` (None: not stored)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [t if math.isfinite(t) else ("inf" if t > 0 else "-inf") for t in self.thresholds]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerProfile:
        return cls(**{**d, "thresholds": [float(t) for t in d["thresholds"]]})

    def band_at(self, units: int, density: float) -> tuple[int, int]:
        """Units per token a token's selection may have at ``density`` (the stored band scaled from
        the calibrated density, or the legacy band); outside it the token is out of distribution."""
        if self.units_band is not None:
            lo, hi = self.units_band
        else:
            lo, hi = LEGACY_BAND[0] * self.density * units, LEGACY_BAND[1] * self.density * units
        scale = density / self.density if self.density > 0 else 1.0
        return max(0, math.floor(lo * scale)), min(units, math.ceil(hi * scale))

    def threshold_at(self, density: float) -> float:
        """Linear interpolation of the calibrated threshold at ``density``."""
        if density >= 1.0:
            return -math.inf
        g, th = self.grid, self.thresholds
        if density <= g[0]:
            return th[0]
        for i in range(1, len(g)):
            if density <= g[i]:
                if not math.isfinite(th[i]):
                    return th[i - 1]  # between the last finite point and "everything": stay calibrated
                w = (density - g[i - 1]) / (g[i] - g[i - 1])
                return th[i - 1] * (1 - w) + th[i] * w
        return th[-1]

    def density_at(self, threshold: float) -> float:
        """The calibrated density a ``threshold`` gives (the inverse of ``threshold_at``; thresholds
        fall as density rises), interpolated linearly between grid points."""
        g, th = self.grid, self.thresholds
        if threshold == -math.inf:
            return 1.0
        if threshold >= th[0]:
            return g[0]  # at most the sparsest calibrated point
        for i in range(1, len(g)):
            if threshold >= th[i]:
                if not math.isfinite(th[i]):
                    return g[i - 1]
                w = (th[i - 1] - threshold) / (th[i - 1] - th[i]) if th[i - 1] != th[i] else 1.0
                return g[i - 1] * (1 - w) + g[i] * w
        return 1.0


def units_band(counts: torch.Tensor, units: int) -> list[int]:
    """The stored band from the units per token counts [T] of the calibrated selection."""
    q = torch.quantile(counts.double(), torch.tensor(BAND_QUANTILES, dtype=torch.float64))
    return [max(0, math.floor(float(q[0]) * BAND_WIDEN[0])), min(units, math.ceil(float(q[1]) * BAND_WIDEN[1]))]


def layer_densities(profiles: list[LayerProfile], density: float, allocation: str, lo: float, hi: float) -> list[float]:
    """Per-layer densities for a new global ``density`` from stored sensitivities."""
    if allocation == "uniform" or density >= 1.0:
        return [density] * len(profiles)
    grid = torch.tensor(profiles[0].grid, dtype=torch.float64)
    cost = torch.tensor([p.cost for p in profiles], dtype=torch.float64)
    return allocate_densities(grid, cost, density, min(lo, density), max(hi, density))


def apply_density(
    mods, density: float, allocation: str = "sensitivity", lo: float = 0.15, hi: float = 1.0
) -> list[float]:
    """Move routed modules to a new mean ``density`` (the override for quick sweeps).

    Returns the per-layer densities used. Raises ``ValueError`` for modules without a profile.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density: must be in (0, 1], got {density}")
    profiles = [m.profile for m in mods]
    if any(p is None for p in profiles):
        raise ValueError("density: these routed layers carry no calibration profile; convert the model again")
    per_layer = layer_densities(profiles, density, allocation, lo, hi)
    for m, p, d in zip(mods, profiles, per_layer, strict=True):
        m.set_policy(policy_for(m, p, d))
    return per_layer


def policy_for(m, p: LayerProfile, d: float) -> LayerPolicy:
    """The policy of routed layer ``m`` (its ``units``) at density ``d``, from its profile ``p``."""
    if d >= 1.0:
        return LayerPolicy.dense(m.units)
    if p.policy == "topk":
        return LayerPolicy.topk(max(1, round(d * m.units)))
    return LayerPolicy(p.threshold_at(d), p.min_units, p.max_units)
