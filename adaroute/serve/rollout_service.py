"""Wires a Rollout into a running Service: arm choice, finished requests, shadow jobs, metrics, audit.

    service = Service(model, config)
    staged = StagedRollout(service, Rollout("shadow", gates), routed_dir)   # before the app starts

Everything here runs on the server's event loop except the shadow thread, whose results are handed
back to the loop before they touch the rollout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adaroute.serve.errors import APIError
from adaroute.serve.gates import GateConfig
from adaroute.serve.rollout import RequestOutcome, Rollout, RolloutEvent
from adaroute.serve.rollout_metrics import RolloutMetrics
from adaroute.serve.service import Admission, Pending, Service
from adaroute.serve.shadow import Rescorer, ShadowJob, ShadowQueue, ShadowResult

log = logging.getLogger("adaroute.serve")
CALIBRATION_TOKENS = 256  # tokens of the calibration text behind the default gates (about a second)


class StagedRollout:
    def __init__(self, service: Service, rollout: Rollout, calibrated_density: float | None = None,
                 shadow_capacity: int = 4):
        if "routed" not in service.model.arms:
            raise ValueError(f"a rollout needs a routed model; {service.model.name} serves only the dense arm")
        self.service, self.rollout = service, rollout
        engines = service.model.engines
        self.shadow = ShadowQueue(engines["routed"].w, self._from_shadow_thread, shadow_capacity)
        failsafes = [engines["routed"].failsafe, self.shadow.rescorer.routed.failsafe]
        self.metrics = RolloutMetrics(service.metrics.registry, [f for f in failsafes if f is not None],
                                      calibrated_density)
        self.routed_layers = len(engines["routed"].failsafe.routed) if engines["routed"].failsafe else 0
        rollout.on_event, rollout.on_alert = self._on_event, self._on_alert
        for event in rollout.events:  # the start event came before these hooks
            self._on_event(event)
        service.choose_arm = self.choose_arm
        service.on_finish.append(self.finished)
        service.on_stop.append(self.shadow.close)

    def choose_arm(self, adm: Admission) -> str:
        if adm.requested_arm is not None:
            raise APIError(400, f"arm: the rollout chooses the arm (stage {self.rollout.stage}); send no 'arm'",
                           param="arm", reason="bad_request")
        adm.stage = self.rollout.stage
        return self.rollout.choose_arm(adm.client_key)

    def finished(self, p: Pending) -> None:
        fin = p.finished
        if fin.reason in ("error", "cancelled") and fin.completion_tokens == 0:
            return
        events = sum(fin.failsafe.values())
        self.rollout.on_request(RequestOutcome(p.arm, fin.completion_tokens, fin.latency_s, fin.ttft_s, fin.density,
                                               events, self.routed_layers if p.arm == "routed" else 0))
        answer = p.text.tokens
        if answer and fin.reason != "error" and self.rollout.wants_shadow():
            if not self.shadow.offer(ShadowJob(p.req.id, list(p.adm.prompt_ids), list(answer), p.arm)):
                self.metrics.dropped.inc()

    def _from_shadow_thread(self, result: ShadowResult) -> None:
        self.service.loop.call_soon_threadsafe(self._shadowed, result)

    def _shadowed(self, result: ShadowResult) -> None:
        self.metrics.agreement.observe(result.agreement)
        self.metrics.kl.observe(result.kl)
        if self.service.audit is not None:
            self.service.audit.update_shadow(result.request_id, result.agreement, result.kl)
        self.rollout.on_shadow(result)

    def _on_event(self, event: RolloutEvent) -> None:
        self.metrics.set_stage(event.to_stage)
        if event.kind == "rollback":
            self.metrics.rollbacks.inc()
        if self.service.audit is not None:
            self.service.audit.write_event(event)

    def _on_alert(self, reason: str) -> None:
        self.metrics.alerts.labels(reason).inc()


def calibration_of(routed_dir: Path | None) -> dict:
    """calibration.json of a routed directory ({} when there is none or it cannot be read)."""
    try:
        return json.loads((routed_dir / "calibration.json").read_text()) if routed_dir else {}
    except (OSError, ValueError):
        return {}


def default_gates(service: Service, calibration: dict) -> GateConfig:
    """Gates from the model's calibration quality: stored agreement and KL, or measured now on the
    first CALIBRATION_TOKENS tokens of the calibration text (class defaults when it is not at hand)."""
    agreement, kl = calibration.get("agreement"), calibration.get("kl")
    if agreement is None:
        model = service.model
        agreement, kl = calibration_quality(model.engines["routed"].w, model.text_ids, calibration.get("data") or [])
    return GateConfig.from_calibration(agreement, kl)


def calibration_quality(weights, text_ids, specs: list[str]) -> tuple[float | None, float | None]:
    """Teacher-forced (agreement, KL) of routed against dense on the calibration text ``specs``."""
    from adaroute.data import load_texts  # noqa: PLC0415

    try:
        text = "\n\n".join(t.text for t in load_texts(specs))
    except Exception as e:  # data named by a calibration.json may live on another machine
        log.warning("gates: calibration data %s not readable (%s); using the built-in defaults", specs, e)
        return None, None
    ids = text_ids(text[:CALIBRATION_TOKENS * 16])[:CALIBRATION_TOKENS]
    if len(ids) < 16:
        return None, None
    result = Rescorer(weights)(ShadowJob("calibration", ids[:1], ids[1:], "calibration"))
    return result.agreement, result.kl
