"""Staged rollout of the routed arm: dense -> shadow -> canary -> routed, with gates and automatic rollback.

    dense   every request answered by the dense arm (the baseline)
    shadow  dense answers; a sampled share is re-scored by the routed arm off the request path
    canary  a share of clients (sticky: the hash of ``user`` or ``X-Adaroute-Key``; per request when
            neither is sent) is answered by routed; shadow sampling continues on the dense share
    routed  every request routed; shadow sampling continues at a quarter of the shadow share

Every finished routed request and every shadow result feeds the gates (``gates.py``); a breach drops
the stage to ``dense`` at once, raises an alert and stays there until an admin sets another stage.
With auto-promotion the stage moves on once its gates have passed ``promote_after`` samples. The
controller lives on the server's event loop: every call into it comes from there, so it needs no lock.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from adaroute.serve.errors import APIError
from adaroute.serve.gates import GateConfig, Gates, Verdict
from adaroute.serve.shadow import ShadowResult

log = logging.getLogger("adaroute.serve")

STAGES = ("dense", "shadow", "canary", "routed")
ROUTED_SHADOW_SHARE = 0.25  # in the routed stage, shadow this share of --shadow-fraction
NEXT = {"shadow": "canary", "canary": "routed"}
PROMOTION_GATES = {"shadow": ("agreement", "kl", "failsafe_rate"),
                   "canary": ("agreement", "kl", "failsafe_rate", "itl_ratio")}
KPI_WINDOW = 200  # finished requests per arm behind the live KPIs


@dataclass
class RolloutEvent:
    """One row of the audit log's rollout_events table."""

    created: float
    actor: str  # "admin:<key id>", "gates" or "startup"
    kind: str  # set | rollback | promote | start
    from_stage: str | None
    to_stage: str
    reason: str
    settings: dict = field(default_factory=dict)  # fractions after the change
    window: dict = field(default_factory=dict)  # gate verdicts at that moment


@dataclass
class RequestOutcome:
    """What the rollout learns from a finished request."""

    arm: str
    tokens: int
    latency_s: float
    ttft_s: float | None
    density: float
    failsafe_events: int
    routed_layers: int

    @property
    def itl_s(self) -> float | None:
        if self.ttft_s is None or self.tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)

    @property
    def failsafe_rate(self) -> float:
        slots = self.routed_layers * max(self.tokens - 1, 1)
        return self.failsafe_events / slots if slots else 0.0


def bucket(key: str, salt: str = "adaroute-canary") -> float:
    """A client's fixed place in [0, 1): the first 8 bytes of SHA-256(salt, key)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


class Rollout:
    def __init__(self, stage: str, gates: GateConfig, canary_fraction: float = 0.1, shadow_fraction: float = 0.2,
                 auto_promote: bool = False, seed: int = 0,
                 on_event: Callable[[RolloutEvent], None] | None = None,
                 on_alert: Callable[[str], None] | None = None):
        check_stage(stage)
        check_fraction("canary_fraction", canary_fraction)
        check_fraction("shadow_fraction", shadow_fraction)
        self.stage, self.canary_fraction, self.shadow_fraction = stage, canary_fraction, shadow_fraction
        self.auto_promote, self.seed = auto_promote, seed
        self.gates = Gates(gates)
        self.on_event, self.on_alert = on_event or (lambda e: None), on_alert or (lambda r: None)
        self._rng = random.Random(seed)
        self._dense_itl = collections.deque(maxlen=gates.window)  # the dense arm's ITL baseline
        self.kpis = {arm: collections.deque(maxlen=KPI_WINDOW) for arm in ("dense", "routed")}
        self.shadow_kpis: collections.deque[ShadowResult] = collections.deque(maxlen=KPI_WINDOW)
        self.events: collections.deque[RolloutEvent] = collections.deque(maxlen=50)
        self._emit(RolloutEvent(time.time(), "startup", "start", None, stage, "server started", self.settings()))

    # -- per request ----------------------------------------------------------------------------
    def choose_arm(self, client_key: str | None) -> str:
        if self.stage in ("dense", "shadow"):
            return "dense"
        if self.stage == "routed":
            return "routed"
        draw = bucket(client_key, f"adaroute-canary-{self.seed}") if client_key else self._rng.random()
        return "routed" if draw < self.canary_fraction else "dense"

    def wants_shadow(self) -> bool:
        """Whether a request (just finished, any arm) is re-scored, per the current stage."""
        share = {"dense": 0.0, "shadow": self.shadow_fraction, "canary": self.shadow_fraction,
                 "routed": self.shadow_fraction * ROUTED_SHADOW_SHARE}[self.stage]
        return share > 0 and self._rng.random() < share

    def on_request(self, outcome: RequestOutcome) -> None:
        self.kpis[outcome.arm].append(outcome)
        itl = outcome.itl_s
        if outcome.arm == "dense":
            if itl is not None:
                self._dense_itl.append(itl)
            return
        if self.stage == "dense":
            return  # stragglers of a rolled-back stage judge nothing
        self._judge("failsafe_rate", outcome.failsafe_rate)
        baseline = sum(self._dense_itl) / len(self._dense_itl) if len(self._dense_itl) >= 2 else None
        if itl is not None and baseline:
            self._judge("itl_ratio", itl / baseline)

    def on_shadow(self, result: ShadowResult) -> None:
        self.shadow_kpis.append(result)
        if self.stage == "dense" or result.tokens == 0:
            return
        for gate, value in (("agreement", result.agreement), ("kl", result.kl),
                            ("failsafe_rate", result.failsafe_rate)):
            if self.stage == "dense":
                return  # the previous gate rolled back
            self._judge(gate, value)

    # -- decisions ----------------------------------------------------------------------------
    def _judge(self, gate: str, value: float) -> None:
        verdict = self.gates.observe(gate, value)
        if verdict.breached:
            self._rollback(verdict)
        elif self.auto_promote and self.stage in NEXT and self.gates.promotable(PROMOTION_GATES[self.stage]):
            self._change("gates", "promote", NEXT[self.stage], "every gate passed "
                         f"{self.gates.config.promote_after} samples")

    def _rollback(self, v: Verdict) -> None:
        side = "below its minimum" if v.gate == "agreement" else "above its maximum"
        why = (f"{v.gate} breached: window mean {v.mean:.4g} over {v.n} samples, confidence bound {v.bound:.4g} "
               f"{side} {v.limit:.4g}")
        log.warning("rollout: rolling back %s -> dense: %s", self.stage, why)
        self.on_alert(v.gate)
        self._change("gates", "rollback", "dense", why)

    def set(self, actor: str, stage: str | None = None, canary_fraction: float | None = None,
            shadow_fraction: float | None = None, reason: str = "") -> RolloutEvent:
        """An admin's change (validated first: a bad value changes nothing)."""
        if stage is not None:
            check_stage(stage)
        for name, value in (("canary_fraction", canary_fraction), ("shadow_fraction", shadow_fraction)):
            if value is not None:
                check_fraction(name, value)
        if canary_fraction is not None:
            self.canary_fraction = canary_fraction
        if shadow_fraction is not None:
            self.shadow_fraction = shadow_fraction
        return self._change(actor, "set", stage or self.stage, reason or "set by an admin")

    def _change(self, actor: str, kind: str, to: str, reason: str) -> RolloutEvent:
        event = RolloutEvent(time.time(), actor, kind, self.stage, to, reason, self.settings(), self.gates.snapshot())
        if to != self.stage:
            self.stage = to
            self.gates.reset()  # each stage is judged on its own samples
        self._emit(event)
        return event

    def _emit(self, event: RolloutEvent) -> None:
        self.events.append(event)
        self.on_event(event)

    # -- what the admin sees --------------------------------------------------------------------
    def settings(self) -> dict:
        return {"canary_fraction": self.canary_fraction, "shadow_fraction": self.shadow_fraction,
                "auto_promote": self.auto_promote}

    def status(self) -> dict:
        return {"stage": self.stage, **self.settings(), "gates": self.gates.config.to_dict(),
                "window": self.gates.snapshot(), "arms": {arm: arm_kpis(list(q)) for arm, q in self.kpis.items()},
                "shadow": shadow_kpis(list(self.shadow_kpis)),
                "events": [asdict(e) for e in list(self.events)[-10:]]}


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise APIError(400, f"stage: must be one of {', '.join(STAGES)}, got {stage!r}", param="stage")


def check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise APIError(400, f"{name}: must be a number in [0, 1], got {value!r}", param=name)


def arm_kpis(rows: list[RequestOutcome]) -> dict:
    """Live KPIs of one arm over its last finished requests."""
    if not rows:
        return {"requests": 0}
    lat = sorted(r.latency_s for r in rows)
    itl = [r.itl_s for r in rows if r.itl_s is not None]
    busy = sum(r.latency_s for r in rows)
    return {"requests": len(rows), "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95),
            "itl_mean_s": _mean(itl), "tokens_per_s": sum(r.tokens for r in rows) / busy if busy else None,
            "mean_density": _mean([r.density for r in rows]),
            "failsafe_rate": _mean([r.failsafe_rate for r in rows])}


def shadow_kpis(rows: list[ShadowResult]) -> dict:
    return {"samples": len(rows), "agreement": _mean([r.agreement for r in rows]), "kl": _mean([r.kl for r in rows]),
            "failsafe_rate": _mean([r.failsafe_rate for r in rows])}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None


def _pct(ordered: list[float], p: int) -> float:
    return round(ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))], 5)
