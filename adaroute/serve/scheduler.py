"""Continuous batching: one engine thread decodes every live sequence; requests join and leave between steps.

Shape letters: n live sequences of one arm, L layers, V vocabulary.

Per iteration the thread (1) drops cancelled sequences, (2) admits at most one waiting request:
prefills its prompt alone, samples its first token and adds it to its arm's batch (so a new prompt
stalls the others for its own prefill only), (3) runs one decode step for each arm with live
sequences (an arm is an engine over the shared weights: ``dense`` runs routed layers with every
unit, ``routed`` follows the execution policy). A finished sequence frees its row at once.

The thread never touches asyncio: each iteration hands its new tokens and finished requests to
``deliver`` in one call (the server turns that into one ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adaroute.kernels import cpu
from adaroute.runtime import Engine, SamplingConfig, next_tokens
from adaroute.runtime.failsafe import REASONS
from adaroute.serve.slots import SlotCache

log = logging.getLogger("adaroute.serve")


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new requests."""


@dataclass
class GenRequest:
    id: str
    prompt: list[int]
    max_tokens: int
    arm: str
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    arrival: float = field(default_factory=time.perf_counter)
    context: object = None  # the caller's handle, passed back with every event
    explain: bool = False  # keep (input token, units per layer) of every decode step


@dataclass
class Finished:
    """Why and how a request ended, with its routing statistics over its decode steps."""

    reason: str  # stop | length | cancelled | error
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    layer_density: list[float]  # per layer: units computed / units, over decode steps (1.0 = dense)
    units_per_token: dict[str, float]  # mean / std / min / max units per layer and token, and "of" (F)
    failsafe: dict[str, int] = field(default_factory=dict)  # (layer, token) fail-safe events by reason
    steps: list[tuple[int, list[int]]] | None = None  # explain: (input token, units [L]) per decode step

    @property
    def density(self) -> float:
        return sum(self.layer_density) / len(self.layer_density) if self.layer_density else 1.0


# (request, new tokens, emit times, Finished or None) per request touched in an iteration
Event = tuple[GenRequest, list[int], float, "Finished | None"]


class _Live:
    """A decoding sequence: its request, last token (fed at the next step) and unit counts."""

    def __init__(self, req: GenRequest, layers: int):
        self.req, self.generated, self.last = req, 0, -1
        self.rng = None if req.sampling.greedy else req.sampling.generator()
        self.first_at: float | None = None
        self.layer_units = torch.zeros(layers, dtype=torch.float64)  # [L] units over decode steps
        self.steps = 0
        self.tok_sum = self.tok_sq = 0.0  # per-token units (mean over layers), for the summary
        self.tok_min, self.tok_max = float("inf"), 0.0
        self.failsafe = [0] * len(REASONS)  # fail-safe events by reason (runtime.failsafe codes 1..3)
        self.explained: list[tuple[int, list[int]]] | None = [] if req.explain else None


class Scheduler:
    """``engines``: arm name -> engine (same weights). ``deliver(events)`` is called from the
    engine thread once per iteration that produced anything; ``on_step(arm, units)`` once per decode
    step with units [L, n] per layer and sequence (-1 where a layer ran dense)."""

    def __init__(self, engines: dict[str, Engine], stop_tokens: set[int], max_batch: int, max_queue: int,
                 max_len: int, deliver: Callable[[list[Event]], None],
                 on_step: Callable[[str, torch.Tensor], None] | None = None):
        self.engines, self.stops = engines, frozenset(stop_tokens)
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.deliver, self.on_step = deliver, on_step
        for e in engines.values():
            e.record_units = True
        first = next(iter(engines.values())).w
        self.layers, self.units = len(first.layers), first.layers[0].ffn.w_gate.shape[0]
        self._batches: dict[str, SlotCache] = {}  # created on first use (one KV cache per arm)
        self._live: dict[str, list[_Live]] = {arm: [] for arm in engines}
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._cancel: dict[str, str] = {}  # request id -> reason
        self._pending_cancel: list[tuple[GenRequest, str]] = []  # cancelled while waiting, to report
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="adaroute-engine", daemon=True)

    # -- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread; call it from the thread that built the engines, once that thread's
        torch work is done: its OpenMP workers are released so that only the engine thread's remain
        (kernels.cpu.release_openmp_workers says why that matters)."""
        cpu.release_openmp_workers()
        self._thread.start()

    def submit(self, req: GenRequest) -> None:
        if req.arm not in self.engines:
            raise ValueError(f"arm {req.arm!r} is not served; choose one of {sorted(self.engines)}")
        with self._wake:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue holds {self.max_queue})")
            self._waiting.append(req)
            self._wake.notify()

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        with self._wake:
            self._cancel.setdefault(request_id, reason)
            self._wake.notify()

    def counts(self) -> dict[str, tuple[int, int]]:
        """arm -> (running, waiting); read without the lock (a gauge may lag one iteration)."""
        waiting = collections.Counter(r.arm for r in list(self._waiting))
        return {arm: (len(live), waiting[arm]) for arm, live in self._live.items()}

    def stop(self, timeout: float | None = None) -> None:
        """Cancels whatever is still waiting or decoding (each gets a ``cancelled`` event) and joins."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._cancel and not self._any_live():
                    self._wake.wait()
                cancel, self._cancel = self._cancel, {}
                if self._stopping:
                    cancel.update({r.id: "cancelled" for r in self._waiting})
                    cancel.update({s.req.id: "cancelled" for live in self._live.values() for s in live})
                admit = self._next_admission(cancel)
            events: list[Event] = []
            self._drop(cancel, events)
            if self._stopping:
                self._flush(events)
                return
            if admit is not None:
                self._admit(admit, events)
            for arm, live in self._live.items():
                if live:
                    self._step(arm, live, events)
            self._flush(events)

    def _any_live(self) -> bool:
        return any(self._live.values())

    def _next_admission(self, cancel: dict[str, str]) -> GenRequest | None:
        """(Holding the lock.) Waiting requests that were cancelled are dropped; returns the first
        other one if a row is free."""
        cancelled = [r for r in self._waiting if r.id in cancel]
        for r in cancelled:
            self._waiting.remove(r)
            self._pending_cancel.append((r, cancel.pop(r.id)))
        if self._waiting and sum(len(v) for v in self._live.values()) < self.max_batch:
            return self._waiting.popleft()
        return None

    def _drop(self, cancel: dict[str, str], events: list[Event]) -> None:
        pending, self._pending_cancel = self._pending_cancel, []
        for req, reason in pending:
            events.append((req, [], time.perf_counter(), self._finished(None, req, reason)))
        if not cancel:
            return
        for arm, live in self._live.items():
            for s in [s for s in live if s.req.id in cancel]:
                self._leave(arm, s, cancel[s.req.id], events, [])

    def _admit(self, req: GenRequest, events: list[Event]) -> None:
        engine = self.engines[req.arm]
        s = _Live(req, self.layers)
        try:
            prompt = engine.new_cache(1, len(req.prompt))
            logits = engine.forward(torch.tensor([req.prompt]), prompt)  # [1, V]
        except Exception:  # a request the engine cannot run must not take the server down
            log.exception("prefill of request %s failed", req.id)
            events.append((req, [], time.perf_counter(), self._finished(None, req, "error")))
            return
        token = self._sample(logits, [s])[0]
        batch = self._batch(req.arm)
        batch.join(prompt, len(req.prompt))
        self._live[req.arm].append(s)
        self._emit(req.arm, s, token, events)

    def _batch(self, arm: str) -> SlotCache:
        if arm not in self._batches:
            self._batches[arm] = SlotCache(self.engines[arm], self.max_batch, self.max_len)
        return self._batches[arm]

    def _step(self, arm: str, live: list[_Live], events: list[Event]) -> None:
        engine, batch = self.engines[arm], self._batches[arm]
        try:
            view = batch.step_view()
            logits = engine.forward(torch.tensor([[s.last] for s in live]), view)  # [n, V]
        except Exception:  # end this arm's sequences with an error rather than the engine thread
            log.exception("decode step failed; ending the %d %s sequences", len(live), arm)
            for s in list(live):
                self._leave(arm, s, "error", events, [])
            return
        batch.stepped(view)
        self._count_units(live, engine.last_units, arm)
        self._count_failsafe(live, engine.last_failsafe)
        for s, token in zip(list(live), self._sample(logits, live), strict=True):
            self._emit(arm, s, token, events)

    def _count_units(self, live: list[_Live], units: torch.Tensor | None, arm: str) -> None:
        """units [L, n], -1 where a layer ran dense (every unit computed)."""
        if units is None:
            units = torch.full((self.layers, len(live)), -1, dtype=torch.long)
        if self.on_step is not None:
            self.on_step(arm, units)
        u = torch.where(units < 0, self.units, units).to(torch.float64)  # [L, n]
        per_token = (u.mean(0)).tolist()  # [n]
        for i, s in enumerate(live):
            s.layer_units += u[:, i]
            s.steps += 1
            t = per_token[i]
            s.tok_sum, s.tok_sq = s.tok_sum + t, s.tok_sq + t * t
            s.tok_min, s.tok_max = min(s.tok_min, t), max(s.tok_max, t)
            if s.explained is not None:  # the step's input is the last token this sequence emitted
                s.explained.append((s.last, [int(x) for x in u[:, i].tolist()]))

    @staticmethod
    def _count_failsafe(live: list[_Live], codes: torch.Tensor | None) -> None:
        """codes [L, n]: each sequence's fail-safe events of this step (0 = none)."""
        if codes is None or not bool(codes.any()):
            return
        for reason in range(1, len(REASONS) + 1):
            for i, n in enumerate((codes == reason).sum(0).tolist()):
                live[i].failsafe[reason - 1] += n

    def _sample(self, logits: torch.Tensor, live: list[_Live]) -> list[int]:
        """logits [n, V] -> one token per sequence: argmax for greedy ones, each sampled one with its own generator."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(live):
            if s.rng is not None:
                tokens[i] = int(next_tokens(logits[i:i + 1], s.req.sampling, s.rng)[0])
        return tokens

    def _emit(self, arm: str, s: _Live, token: int, events: list[Event]) -> None:
        now = time.perf_counter()
        s.generated += 1
        s.last = token
        if s.first_at is None:
            s.first_at = now
        reason = "stop" if token in self.stops else "length" if s.generated >= s.req.max_tokens else None
        if reason is None:
            events.append((s.req, [token], now, None))
            return
        self._leave(arm, s, reason, events, [token])

    def _leave(self, arm: str, s: _Live, reason: str, events: list[Event], tokens: list[int]) -> None:
        live = self._live[arm]
        row = live.index(s)
        moved = self._batches[arm].leave(row)
        if moved is not None:
            live[row] = live[moved]
        live.pop()
        events.append((s.req, tokens, time.perf_counter(), self._finished(s, s.req, reason)))

    def _finished(self, s: _Live | None, req: GenRequest, reason: str) -> Finished:
        now = time.perf_counter()
        if s is None or s.steps == 0:
            layer_density = [1.0] * self.layers if s is not None else []
            summary = {"mean": float(self.units), "std": 0.0, "min": float(self.units), "max": float(self.units)}
        else:
            layer_density = (s.layer_units / (s.steps * self.units)).tolist()
            mean = s.tok_sum / s.steps
            std = max(s.tok_sq / s.steps - mean * mean, 0.0) ** 0.5
            summary = {"mean": mean, "std": std, "min": s.tok_min, "max": s.tok_max}
        failsafe = {} if s is None else {r: n for r, n in zip(REASONS, s.failsafe, strict=True) if n}
        return Finished(reason, 0 if s is None else s.generated,
                        None if s is None or s.first_at is None else s.first_at - req.arrival,
                        now - req.arrival, layer_density, {**summary, "of": self.units}, failsafe,
                        None if s is None else s.explained)

    def _flush(self, events: list[Event]) -> None:
        if events:
            self.deliver(events)
