"""Rollout and fail-safe metrics, in the server's registry (names: the contract in docs/serving.md).

Fail-safe counts live in the engines (``FailSafe.totals``, updated by the engine threads), so they
are read at scrape time by a custom collector rather than copied into a Counter on every step.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from adaroute.runtime.failsafe import REASONS, FailSafe
from adaroute.serve.rollout import STAGES

SHARE_BUCKETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0)
KL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry, failsafes: list[FailSafe], calibrated_density: float | None):
        p = "adaroute:"
        self.stage = Gauge(p + "rollout_stage", "1 for the current rollout stage", ["stage"], registry=registry)
        self.alerts = Counter(p + "alerts", "rollout alerts by the gate that fired", ["reason"], registry=registry)
        self.rollbacks = Counter(p + "rollbacks", "automatic rollbacks to the dense stage", registry=registry)
        self.agreement = Histogram(p + "shadow_agreement", "per shadowed request: top-1 agreement of routed "
                                   "with dense", buckets=SHARE_BUCKETS, registry=registry)
        self.kl = Histogram(p + "shadow_kl", "per shadowed request: mean KL(dense || routed) per token",
                            buckets=KL_BUCKETS, registry=registry)
        self.dropped = Counter(p + "shadow_dropped", "shadow jobs dropped because the queue was full",
                               registry=registry)
        density = Gauge(p + "calibrated_density", "the routed model's calibrated mean FFN density", registry=registry)
        if calibrated_density is not None:
            density.set(calibrated_density)
        registry.register(_FailSafeCollector(failsafes))

    def set_stage(self, stage: str) -> None:
        for s in STAGES:
            self.stage.labels(s).set(1.0 if s == stage else 0.0)


class _FailSafeCollector:
    """adaroute:failsafe_total{layer,reason}, summed over the engines that route (served and shadow)."""

    def __init__(self, failsafes: list[FailSafe]):
        self.failsafes = failsafes

    def collect(self):
        family = CounterMetricFamily("adaroute:failsafe", "tokens a routed layer computed densely, by reason",
                                     labels=["layer", "reason"])
        totals = sum(fs.totals.clone() for fs in self.failsafes) if self.failsafes else None
        if totals is not None:
            for layer in sorted({i for fs in self.failsafes for i in fs.routed}):
                for r, reason in enumerate(REASONS):
                    family.add_metric([str(layer), reason], float(totals[layer, r]))
        yield family
