"""Per-token dense fail-safe of routed layers, and a fault-injection hook that exercises it.

Shape letters: L layers, N tokens in flight, H hidden size, F FFN units.

A routed layer running sparse computes a token densely instead (every unit, the dense model's own
FFN) when, for that token,

    band       its selection has fewer or more units than the layer's calibrated band
               (``LayerProfile.band_at``: an out-of-distribution input or a broken router),
    nonfinite  the sparse output is not finite,
    error      the sparse kernel raised (then every token of the call).

So a request never fails because the sparse path did, and each event is counted by layer and reason
(``FailSafe.totals``; ``Engine.last_failsafe`` holds the codes of the last call for a server's
per-request accounting). The compiled CPU path (``decode_step.cpp``) applies the same rule; this
module is its reference.

``FaultInjector`` makes a seeded share of decode steps faulty, for tests and for checking that a
degraded routed arm is noticed: ``scores`` corrupts one layer's router scores (its unit biases are
permuted: a wrong but plausible selection, which only the quality gates can see), ``raise`` makes
its sparse kernel raise, ``nan`` makes its sparse output NaN.
"""

from __future__ import annotations

import logging
import math
import random
from types import ModuleType

import torch

from adaroute.runtime.weights import ModelWeights, RoutedFFN

log = logging.getLogger("adaroute.runtime")

REASONS = ("band", "nonfinite", "error")  # event codes 1, 2, 3 (0: the token ran sparse)
BAND, NONFINITE, ERROR = 1, 2, 3
FAULTS = ("scores", "raise", "nan")
FAULT_CODES = {"scores": 1, "raise": 2, "nan": 3}  # as decode_step.cpp reads ArLayer.fault


class InjectedFault(RuntimeError):
    """Raised in the sparse path by ``FaultInjector`` (kind ``raise``)."""


class FaultInjector:
    """On a share ``rate`` of steps, one routed layer (chosen at random, or from ``layers``) gets a
    fault of a kind drawn from ``kinds``; everything is drawn from ``seed``."""

    def __init__(self, kinds: tuple[str, ...] = FAULTS, rate: float = 0.1, seed: int = 0,
                 layers: tuple[int, ...] | None = None, every_layer: bool = False):
        bad = [k for k in kinds if k not in FAULTS]
        if bad or not kinds:
            raise ValueError(f"faults: unknown kind(s) {bad or kinds}; choose from {', '.join(FAULTS)}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"faults: rate must be in [0, 1], got {rate}")
        self.kinds, self.rate, self.layers, self.every_layer = tuple(kinds), rate, layers, every_layer
        self._rng = random.Random(seed)
        self._seed = seed
        self._biases: dict[int, torch.Tensor] = {}
        self.steps = self.faulty_steps = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> FaultInjector:
        """``KIND[+KIND...][@RATE][:all]``, e.g. ``raise+nan@0.1`` or ``scores@1:all``."""
        spec, _, where = spec.partition(":")
        kinds, _, rate = spec.partition("@")
        if where not in ("", "all"):
            raise ValueError(f"faults: {where!r} after ':' must be 'all' (every routed layer)")
        try:
            value = float(rate) if rate else 1.0
        except ValueError:
            raise ValueError(f"faults: rate {rate!r} is not a number") from None
        return cls(tuple(kinds.split("+")), value, seed, every_layer=where == "all")

    def draw(self, routed: list[int]) -> dict[int, str]:
        """The faults of one step: layer -> kind (empty on a healthy step)."""
        self.steps += 1
        if not routed or self._rng.random() >= self.rate:
            return {}
        self.faulty_steps += 1
        kind = self._rng.choice(self.kinds)
        if self.every_layer:
            return dict.fromkeys(routed, kind)
        return {self._rng.choice(list(self.layers or routed)): kind}

    def corrupted_bias(self, layer: int, ffn: RoutedFFN) -> torch.Tensor:
        """The layer's unit biases, permuted (fixed per layer and seed): scores of the wrong units."""
        if layer not in self._biases:
            g = torch.Generator().manual_seed(self._seed * 1000 + layer)
            perm = torch.randperm(ffn.unit_bias.shape[0], generator=g)
            self._biases[layer] = ffn.unit_bias[perm].contiguous()
        return self._biases[layer]


class FailSafe:
    """Bands of an engine's routed layers, the fault hook, and the event counts."""

    def __init__(self, weights: ModelWeights, faults: FaultInjector | None = None):
        self.w, self.faults = weights, faults
        self.routed = [i for i, ly in enumerate(weights.layers) if isinstance(ly.ffn, RoutedFFN)]
        self.totals = torch.zeros(len(weights.layers), len(REASONS), dtype=torch.int64)  # [L, reasons]
        self.step_faults: dict[int, str] = {}
        self._bands_key, self._bands = None, []

    def begin_step(self) -> dict[int, str]:
        """Draws this call's faults (none without an injector)."""
        self.step_faults = self.faults.draw(self.routed) if self.faults is not None else {}
        return self.step_faults

    def bands(self) -> list[tuple[int, int]]:
        """Per layer (lo, hi) units per token; (0, F) for layers without a calibrated band."""
        key = self.w.policies_key()
        if key != self._bands_key:
            self._bands = [_band(ly.ffn) for ly in self.w.layers]
            self._bands_key = key
        return self._bands

    def record(self, codes: torch.Tensor) -> None:
        """codes [L, N]: adds the events of one call to the totals."""
        if bool((codes > 0).any()):
            for reason in range(1, len(REASONS) + 1):
                self.totals[:, reason - 1] += (codes == reason).sum(1)

    def events(self) -> dict[tuple[int, str], int]:
        """(layer, reason) -> events so far (non-zero ones)."""
        return {(layer, REASONS[r]): int(n) for layer, r in (self.totals > 0).nonzero().tolist()
                for n in [self.totals[layer, r]]}

    def routed_ffn(self, kernel: ModuleType, ffn: RoutedFFN, h: torch.Tensor, x: torch.Tensor, layer: int,
                   codes: torch.Tensor, usage: torch.Tensor | None = None, scoring_copy: bool = True) -> torch.Tensor:
        """The sparse FFN of h [N, H] added to x [N, H] with the fail-safe; returns units per token [N]
        (F for tokens computed densely) and writes each token's event code into codes [N]. ``usage`` [F]
        gets the router's selection, also for tokens recomputed densely (nothing when the kernel raised).
        ``scoring_copy``: the kernel's layout choice (``Engine.scoring_copy``)."""
        threshold, min_units, max_units = ffn.policy()
        units = ffn.w_gate.shape[0]
        fault = self.step_faults.get(layer)
        bias = self.faults.corrupted_bias(layer, ffn) if fault == "scores" else ffn.unit_bias
        try:
            if fault == "raise":
                raise InjectedFault(f"fault injected into layer {layer}'s sparse kernel")
            y, counts = kernel.routed_ffn(h, ffn.w_gate, ffn.w_up, ffn.w_down_t, *ffn.shadow_rows(),
                                          bias, threshold, min_units, max_units, adapter=ffn.adapter,
                                          usage=usage, scoring_copy=scoring_copy)  # [N, H], [N]
            if fault == "nan":
                y[0, 0] = math.nan
            lo, hi = self.bands()[layer]
            code = torch.where(~torch.isfinite(y).all(-1), NONFINITE,
                               torch.where((counts < lo) | (counts > hi), BAND, 0))  # [N]
        except Exception as e:  # any failure of the sparse path: this call's tokens run dense
            if not isinstance(e, InjectedFault):
                log.warning("sparse FFN of layer %d raised (%s); its tokens ran dense", layer, e)
            y, counts = None, torch.full((h.shape[0],), units, dtype=torch.long)
            code = torch.full((h.shape[0],), ERROR, dtype=torch.long)
        bad = code > 0
        if bool(bad.any()):
            dense = kernel.unit_ffn(h[bad].contiguous(), ffn.w_gate, ffn.w_up, ffn.w_down_t)  # [n_bad, H]
            y = dense if y is None else y.index_put_((bad,), dense)
            counts = counts.masked_fill(bad, units)
        x.add_(y)
        codes.copy_(code)
        return counts


def _band(ffn) -> tuple[int, int]:
    if not isinstance(ffn, RoutedFFN):
        return 0, 0
    units = ffn.w_gate.shape[0]
    profile = getattr(ffn.module, "profile", None)
    density = ffn.expected_density()
    if profile is None or density is None or not hasattr(profile, "band_at"):
        return 0, units
    return profile.band_at(units, density)
