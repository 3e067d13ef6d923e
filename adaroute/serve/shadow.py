"""Shadow re-scoring: the routed arm re-reads a finished request's tokens off the request path.

Shape letters: P prompt tokens, M answer tokens, V vocabulary, L layers.

A sampled request's prompt and answer are fed to both arms teacher-forced (the prompt as a prefill,
the answer positions as one batched forward pass, every routed layer sparse with its fail-safe), in
a background thread with its own engines over the shared weights. Per request it yields top-1
agreement of routed with the answer's tokens (the tokens dense emitted; for an answer the routed arm
gave, dense's own argmax) and the mean KL(dense || routed) over the answer positions.

The queue is bounded: a job that finds it full is dropped and counted, never waited for, so
shadowing can cost the served requests CPU time but never a delay in line.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaroute.kernels import cpu
from adaroute.runtime import Engine, ExecutionPolicy, ModelWeights

log = logging.getLogger("adaroute.serve")


@dataclass(frozen=True)
class ShadowJob:
    request_id: str
    prompt: list[int]
    answer: list[int]
    arm: str  # the arm that answered


@dataclass(frozen=True)
class ShadowResult:
    request_id: str
    arm: str
    tokens: int  # answer positions scored
    agreement: float
    kl: float
    failsafe_events: int  # fail-safe events of the routed pass over the answer positions
    failsafe_slots: int  # routed layers x answer positions

    @property
    def failsafe_rate(self) -> float:
        return self.failsafe_events / self.failsafe_slots if self.failsafe_slots else 0.0


class Rescorer:
    """Teacher-forced dense and routed passes over one sequence (engines private to the caller's thread)."""

    def __init__(self, weights: ModelWeights):
        self.dense = Engine(weights, policy=ExecutionPolicy.always_dense())
        self.routed = Engine(weights, policy=ExecutionPolicy.always_dense())  # prefill dense, as served
        self.routed.record_units = True
        self.routed_layers = len(self.routed.failsafe.routed) if self.routed.failsafe else 0

    def __call__(self, job: ShadowJob) -> ShadowResult:
        dense = self._logits(self.dense, job)  # [M, V]
        self.routed.policy = ExecutionPolicy.always_dense()
        routed = self._logits(self.routed, job, sparse_answer=True)  # [M, V]
        codes = self.routed.last_failsafe  # [L, M]
        reference = torch.tensor(job.answer) if job.arm == "dense" else dense.argmax(-1)
        logp_d, logp_r = F.log_softmax(dense, -1), F.log_softmax(routed, -1)
        kl = (logp_d.exp() * (logp_d - logp_r)).sum(-1)  # [M]
        events = int((codes > 0).sum()) if codes is not None else 0
        return ShadowResult(job.request_id, job.arm, len(job.answer),
                            float((routed.argmax(-1) == reference).float().mean()), float(kl.mean()),
                            events, self.routed_layers * len(job.answer))

    def _logits(self, engine: Engine, job: ShadowJob, sparse_answer: bool = False) -> torch.Tensor:
        """Logits [M, V] predicting each answer token: prefill prompt[:-1], then prompt[-1:] + answer[:-1]."""
        prompt, answer = job.prompt, job.answer
        cache = engine.new_cache(1, len(prompt) + len(answer))
        if len(prompt) > 1:
            engine.forward(torch.tensor([prompt[:-1]]), cache)
        if sparse_answer:
            engine.policy = ExecutionPolicy.always_sparse()
        return engine.forward(torch.tensor([prompt[-1:] + answer[:-1]]), cache, all_logits=True)[0]


class ShadowQueue:
    """A bounded queue of ShadowJobs and the thread that runs them; ``on_result`` is called from
    that thread (the server hands it to its event loop)."""

    def __init__(self, weights: ModelWeights, on_result: Callable[[ShadowResult], None], capacity: int = 4):
        self.on_result = on_result
        self.rescorer = Rescorer(weights)
        self.dropped = self.done = self.failed = 0
        self._jobs: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="adaroute-shadow", daemon=True)
        self._thread.start()

    def offer(self, job: ShadowJob) -> bool:
        """Queues ``job``; False (and counted as dropped) when the queue is full."""
        try:
            self._jobs.put_nowait(job)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def depth(self) -> int:
        return self._jobs.qsize()

    def close(self) -> None:
        """Stops after the running job (one re-scoring: seconds at most); jobs still waiting are dropped.
        The join has no timeout: a process that exits while this thread is inside a kernel aborts."""
        while True:
            try:
                self._jobs.get_nowait()
                self.dropped += 1
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                result = self.rescorer(job)
            except Exception:  # a shadow job must never take anything down with it
                self.failed += 1
                log.exception("shadow re-scoring of request %s failed", job.request_id)
                continue
            finally:  # one pool of OpenMP workers in the process, the engine thread's, while it waits
                cpu.release_openmp_workers()
            self.done += 1
            self.on_result(result)
