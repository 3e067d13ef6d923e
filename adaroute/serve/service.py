"""Between HTTP and the engine thread: admission, arm choice, token delivery, the end of a request.

A request is a ``Pending`` on the asyncio side and a ``GenRequest`` on the engine thread. Tokens
come back in one ``call_soon_threadsafe`` per engine iteration. The end of a request (metrics and
audit row) is handled when the engine reports it finished, whether or not the HTTP handler is still
there to read it, so a client that went away is still logged, as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from adaroute.config import ServeConfig
from adaroute.runtime import SamplingConfig
from adaroute.serve.audit import AuditLog, AuditRow, layer_json, sha256, summary_json
from adaroute.serve.errors import APIError
from adaroute.serve.metrics import ServeMetrics
from adaroute.serve.model import ServedModel
from adaroute.serve.scheduler import Event, Finished, GenRequest, QueueFull, Scheduler, ShuttingDown
from adaroute.serve.text import TextStream


@dataclass
class Admission:
    """What the HTTP layer knows of a request before it is queued (the arm chooser's input)."""

    endpoint: str
    prompt_ids: list[int]
    prompt_text: str
    max_tokens: int | None
    sampling: SamplingConfig
    stops: list[str]
    requested_arm: str | None
    key_id: str | None
    client_key: str | None = None  # the request's ``user`` or X-Adaroute-Key header (sticky canary choice)
    stage: str | None = None  # the rollout stage that chose its arm (None without a rollout)
    explain: bool = False  # keep the units of every decode step and layer for the response


# Chooses the arm that answers a request (the rollout plugs its stages in here).
ArmChooser = Callable[[Admission], str]


class Pending:
    """One request on the asyncio side: its token queue and, once known, how it ended."""

    def __init__(self, service: Service, adm: Admission, req: GenRequest):
        self.service, self.adm, self.req = service, adm, req
        self.created = time.time()
        self.pieces_queue: asyncio.Queue[str | Finished] = asyncio.Queue()
        self.text = TextStream(service.model.tokenizer, adm.stops, frozenset(service.model.stop_tokens))
        self.finished: Finished | None = None
        self._last_emit: float | None = None
        self._stop_sent = False

    @property
    def arm(self) -> str:
        return self.req.arm

    def stop_early(self, reason: str) -> None:
        """Ends the request from the HTTP side (stop string, disconnect); the engine confirms with Finished."""
        if self.finished is None and not self._stop_sent:
            self._stop_sent = True
            self.service.scheduler.cancel(self.req.id, reason)

    async def pieces(self):
        """Yields text pieces until the request ends; then ``self.finished`` is set."""
        while isinstance(item := await self.pieces_queue.get(), str):
            yield item

    @property
    def reason(self) -> str:
        return "stop" if self.text.stopped else self.finished.reason

    def completion_tokens(self) -> int:
        fin = self.finished
        return self.text.used if self.text.stopped or fin is None else fin.completion_tokens

    def _on_event(self, tokens: list[int], at: float, fin: Finished | None) -> None:
        """Event loop: text is decoded here, as tokens arrive, so a stop string ends the request
        (and its audit row) whether or not the handler has read that far."""
        itl = self.service.metrics.itl.labels(self.arm)
        for token in tokens:
            if self._last_emit is not None:
                itl.observe(at - self._last_emit)
            self._last_emit = at
            piece = self.text.add(token)
            if piece:
                self.pieces_queue.put_nowait(piece)
            if self.text.stopped:
                self.stop_early("stop")
                break
        if fin is not None:
            tail = self.text.finish()
            if tail:
                self.pieces_queue.put_nowait(tail)
            self.finished = fin
            self.service.finish(self)
            self.pieces_queue.put_nowait(fin)


class Service:
    def __init__(self, model: ServedModel, config: ServeConfig, choose_arm: ArmChooser | None = None):
        self.model, self.config = model, config
        self.default_arm = config.arm or ("routed" if "routed" in model.arms else "dense")
        if self.default_arm not in model.arms:
            raise ValueError(f"arm {self.default_arm!r} needs a routed model; {model.name} serves only {model.arms}")
        self.choose_arm = choose_arm or self._requested_or_default
        self.on_finish: list[Callable[[Pending], None]] = []  # after a request's metrics, before its audit row
        self.on_stop: list[Callable[[], None]] = []  # after the engine thread stops, before the log closes
        self.model_names = {model.name, *model.aliases}
        self.started = time.time()
        first = next(iter(model.engines.values())).w
        usage = model.engines["routed"].unit_usage if "routed" in model.engines else None
        self.metrics = ServeMetrics(first.layers[0].ffn.w_gate.shape[0], len(first.layers), config.max_queue, usage)
        self.audit = AuditLog(config.audit) if config.audit else None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.scheduler = Scheduler(model.engines, model.stop_tokens, config.max_batch, config.max_queue,
                                   model.context, self._deliver, self.metrics.on_step)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.scheduler.start()

    async def stop(self) -> None:
        """Cancels what is left, waits for the engine thread, handles its last events, closes the log."""
        await asyncio.to_thread(self.scheduler.stop)
        done = self.loop.create_future()
        self.loop.call_soon(done.set_result, None)  # after every event the engine thread queued
        await done
        for hook in self.on_stop:
            await asyncio.to_thread(hook)
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)

    def _requested_or_default(self, adm: Admission) -> str:
        return adm.requested_arm or self.default_arm

    def submit(self, adm: Admission) -> Pending:
        arm = self.choose_arm(adm)
        if arm not in self.model.arms:
            raise APIError(400, f"arm {arm!r} is not served by this model; it serves {list(self.model.arms)}",
                           param="arm", reason="bad_request")
        max_tokens = self._budget(adm)
        req = GenRequest(uuid.uuid4().hex, adm.prompt_ids, max_tokens, arm, adm.sampling, explain=adm.explain)
        pending = Pending(self, adm, req)
        req.context = pending
        try:
            self.scheduler.submit(req)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}, reason="queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        return pending

    def _budget(self, adm: Admission) -> int:
        n, limit = len(adm.prompt_ids), self.model.context
        budget = adm.max_tokens if adm.max_tokens is not None else limit - n
        if n == 0:
            raise APIError(400, "the prompt is empty (no tokens)", param="prompt", reason="bad_request")
        if n + max(budget, 1) > limit:
            asked = f" plus max_tokens {adm.max_tokens}" if adm.max_tokens is not None else ""
            raise APIError(400, f"the prompt has {n} tokens{asked}, over this model's context limit of {limit} "
                           "tokens; shorten the prompt or lower max_tokens", param="messages",
                           code="context_length_exceeded", reason="too_long")
        return budget

    def _deliver(self, events: list[Event]) -> None:
        """Engine thread: one hop to the event loop per iteration."""
        self.loop.call_soon_threadsafe(self._dispatch, events)

    @staticmethod
    def _dispatch(events: list[Event]) -> None:
        for req, tokens, at, fin in events:
            req.context._on_event(tokens, at, fin)

    def finish(self, p: Pending) -> None:
        """Metrics and audit row of a finished request (event loop)."""
        fin = p.finished
        tokens = p.completion_tokens()
        if (tokens, p.reason) != (fin.completion_tokens, fin.reason):
            fin = dataclasses.replace(fin, completion_tokens=tokens, reason=p.reason)
        self.metrics.on_finished(p.arm, len(p.adm.prompt_ids), fin)
        for hook in self.on_finish:
            hook(p)
        if self.audit is None:
            return
        ident = self.model.identity
        self.audit.write(AuditRow(
            id=p.req.id, created=p.created, endpoint=p.adm.endpoint, arm=p.arm, model=ident.name,
            base_model=ident.base_model, routed_hash=ident.routed_hash, format_version=ident.format_version,
            prompt_sha256=sha256(p.adm.prompt_text), prompt=p.adm.prompt_text if self.config.audit_prompts else None,
            prompt_tokens=len(p.adm.prompt_ids), completion_tokens=fin.completion_tokens, ttft_s=fin.ttft_s,
            latency_s=fin.latency_s, finish_reason=fin.reason, mean_density=fin.density,
            layer_density=layer_json(fin.layer_density), units_per_token=summary_json(fin.units_per_token),
            key_id=p.adm.key_id, stage=p.adm.stage, failsafe=sum(fin.failsafe.values()),
            failsafe_reasons=json.dumps(fin.failsafe) if fin.failsafe else None))
