"""Prometheus metrics under the ``adaroute:`` prefix: vLLM's request metrics, labelled by arm, plus routing.

Names are a contract with the alert rules and dashboards (see docs/serving.md): change them there too.
Every server builds its own registry (no module-level metric state, so tests can run several).

Shape letters: L layers, n sequences in one decode step, F FFN units.
"""

from __future__ import annotations

import collections
import math

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from adaroute.routing.stats import use_imbalance
from adaroute.serve.scheduler import Finished

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
SHARE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # densities 0.05 .. 1.0
WINDOW_STEPS = 256  # decode steps in the per-layer sliding window
WINDOW_EVERY = 16  # steps between gauge updates


class ServeMetrics:
    """``usage``: the routed arm's unit-usage counter (``Engine.unit_usage`` [L, F]) that the imbalance
    gauge reads; None leaves that gauge without values."""

    def __init__(self, units: int, layers: int, max_queue: int, usage: torch.Tensor | None = None):
        self.registry = r = CollectorRegistry()
        p = "adaroute:"
        self.running = Gauge(p + "num_requests_running", "requests decoding", ["arm"], registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "requests waiting for a batch row", ["arm"], registry=r)
        Gauge(p + "queue_capacity", "waiting requests the queue holds (--max-queue)", registry=r).set(max_queue)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of finished requests", ["arm"], registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "generated tokens", ["arm"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "arrival to first token", ["arm"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "time between tokens of a request", ["arm"],
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "arrival to last token", ["arm"],
                             buckets=E2E_BUCKETS, registry=r)
        self.success = Counter(p + "request_success", "finished requests by reason", ["arm", "finished_reason"],
                               registry=r)
        self.rejected = Counter(p + "requests_rejected", "requests answered 4xx before decoding", ["reason"],
                                registry=r)
        self.density = Histogram(p + "request_ffn_density", "mean FFN density of a request's decode steps", ["arm"],
                                 buckets=SHARE_BUCKETS, registry=r)
        self.units_per_token = Histogram(p + "units_per_token", "FFN units per token and layer (request mean)",
                                         ["arm"], buckets=tuple(round(b * units, 1) for b in SHARE_BUCKETS),
                                         registry=r)
        self.layer_density = Gauge(p + "layer_density", "routed arm: density per layer over the last "
                                   f"{WINDOW_STEPS} decode steps", ["layer"], registry=r)
        self.layer_imbalance = Gauge(p + "layer_unit_imbalance", "routed arm: max over mean unit use per layer "
                                     f"over the last {WINDOW_STEPS} decode steps", ["layer"], registry=r)
        self.decode_steps = Counter(p + "decode_steps", "decode steps by kernel path", ["path"], registry=r)
        self._window = _LayerWindow(layers, units, self.layer_density)
        self._usage = _UsageWindow(usage, self.layer_imbalance) if usage is not None else None

    def on_step(self, arm: str, units: torch.Tensor) -> None:
        """Engine thread, once per decode step: units [L, n], -1 where a layer ran dense."""
        sparse = bool((units >= 0).any())
        self.decode_steps.labels("sparse" if sparse else "dense").inc()
        if arm == "routed":
            if self._window.add(units) and self._usage is not None:
                self._usage.update()

    def on_finished(self, arm: str, prompt_tokens: int, fin: Finished) -> None:
        self.prompt_tokens.labels(arm).inc(prompt_tokens)
        self.generation_tokens.labels(arm).inc(fin.completion_tokens)
        if fin.ttft_s is not None:
            self.ttft.labels(arm).observe(fin.ttft_s)
        self.e2e.labels(arm).observe(fin.latency_s)
        self.success.labels(arm, fin.reason).inc()
        if fin.completion_tokens > 1:
            self.density.labels(arm).observe(fin.density)
            self.units_per_token.labels(arm).observe(fin.units_per_token["mean"])

    def set_queue(self, counts: dict[str, tuple[int, int]]) -> None:
        for arm, (running, waiting) in counts.items():
            self.running.labels(arm).set(running)
            self.waiting.labels(arm).set(waiting)


class _LayerWindow:
    """Per-layer density over the last WINDOW_STEPS decode steps of the routed arm."""

    def __init__(self, layers: int, units: int, gauge: Gauge):
        self.units, self.gauge = units, gauge
        self.steps: collections.deque[tuple[torch.Tensor, int]] = collections.deque()
        self.total, self.tokens, self.since = torch.zeros(layers, dtype=torch.float64), 0, 0

    def add(self, units: torch.Tensor) -> bool:
        """Adds one step; True on the steps the gauges are updated (every WINDOW_EVERY)."""
        u = torch.where(units < 0, self.units, units).sum(1).to(torch.float64)  # [L]
        self.steps.append((u, units.shape[1]))
        self.total += u
        self.tokens += units.shape[1]
        if len(self.steps) > WINDOW_STEPS:
            old, n = self.steps.popleft()
            self.total -= old
            self.tokens -= n
        self.since += 1
        if self.since < WINDOW_EVERY:
            return False
        self.since = 0
        for i, d in enumerate((self.total / (self.tokens * self.units)).tolist()):
            self.gauge.labels(str(i)).set(d)
        return True


class _UsageWindow:
    """Per-layer unit-use imbalance (``routing.stats.use_imbalance``) of the routed arm's selections
    over the same window as ``_LayerWindow``: a snapshot of the engine's cumulative counter at each
    gauge update, the window being the newest minus the one WINDOW_STEPS steps older, so only an
    update costs O(L * F). A layer that selected nothing in the window (a dense layer, or one that
    ran dense throughout) has no value: nothing was routed to measure.

    Snapshots are NumPy copies and the ratio is taken one layer at a time: a [L, F] torch op is split
    over the intra-op threads, and on a machine busier than its cores each such split waits milliseconds
    on a descheduled thread (8 ms per op measured at two threads, load 3); an [F] op and NumPy stay on
    this thread."""

    def __init__(self, usage: torch.Tensor, gauge: Gauge):
        self.usage, self.gauge = usage, gauge
        self.snapshots = collections.deque([usage.numpy().copy()], maxlen=WINDOW_STEPS // WINDOW_EVERY + 1)

    def update(self) -> None:
        self.snapshots.append(self.usage.numpy().copy())
        window = torch.from_numpy(self.snapshots[-1] - self.snapshots[0])  # [L, F]: selections over the window
        for i, counts in enumerate(window):
            ratio = float(use_imbalance(counts))
            if math.isnan(ratio):
                self.gauge.remove(str(i))
            else:
                self.gauge.labels(str(i)).set(ratio)
