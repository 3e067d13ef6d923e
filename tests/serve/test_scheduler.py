"""Continuous batching on the engine: sequences that join mid-decode get the tokens they get alone."""

from __future__ import annotations

import threading

import pytest

from adaroute.runtime import Engine, ExecutionPolicy, SamplingConfig, generate
from adaroute.serve.scheduler import GenRequest, QueueFull, Scheduler
from adaroute.serve.slots import SlotCache
from tests.fixtures import make_tiny_llama

NEW = 24


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(seed=3)


def _prompt(start: int, length: int) -> list[int]:
    return [(start + 7 * i) % 300 + 2 for i in range(length)]


class Recorder:
    """Collects tokens and endings; ``when(id, n, action)`` runs ``action`` once ``id`` has n tokens."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, object] = {}
        self.triggers: list[tuple[str, int, object]] = []
        self.done = threading.Event()
        self.expected = 0

    def when(self, rid: str, n: int, action) -> None:
        self.triggers.append((rid, n, action))

    def __call__(self, events) -> None:
        for req, toks, _, fin in events:
            self.tokens.setdefault(req.id, []).extend(toks)
            for t in [t for t in self.triggers if t[0] == req.id and len(self.tokens[req.id]) >= t[1]]:
                self.triggers.remove(t)
                t[2]()
            if fin is not None:
                self.finished[req.id] = fin
        if len(self.finished) >= self.expected:
            self.done.set()


def _run(engines, plan, max_batch=4, max_len=256, expected=None):
    rec = Recorder()
    rec.expected = expected or len(plan)
    sched = Scheduler(engines, set(), max_batch, 16, max_len, rec)
    first, *later = plan
    for _, after, n, req in later:
        rec.when(after, n, lambda req=req: sched.submit(req))
    sched.start()
    sched.submit(first[3])
    assert rec.done.wait(60), f"finished {sorted(rec.finished)}"
    sched.stop()
    return rec


def _alone(engine, prompt, new=NEW, sampling=None):
    return generate(engine, [prompt], new, sampling).tokens[0]


@pytest.fixture
def shifts(monkeypatch):
    """Every SlotCache shift (delta), to show a test went through the move it is about."""
    seen = []
    original = SlotCache._shift

    def spy(self, delta):
        seen.append(delta)
        return original(self, delta)

    monkeypatch.setattr(SlotCache, "_shift", spy)
    return seen


def test_joining_mid_decode_gives_the_tokens_of_a_request_alone(tiny, shifts):
    """b joins with a shorter prompt (padding), c with a longer one than the batch has decoded (the
    cache shifts right), d after a has left (its row refilled by the last row)."""
    engine = Engine.from_model(tiny)
    prompts = {"a": _prompt(1, 20), "b": _prompt(50, 6), "c": _prompt(90, 70), "d": _prompt(9, 11)}
    plan = [("a", None, 0, GenRequest("a", prompts["a"], NEW, "dense")),
            ("b", "a", 5, GenRequest("b", prompts["b"], NEW, "dense")),
            ("c", "b", 3, GenRequest("c", prompts["c"], NEW, "dense")),
            ("d", "a", NEW, GenRequest("d", prompts["d"], NEW, "dense"))]
    rec = _run({"dense": Engine.from_model(tiny)}, plan)
    assert any(d > 0 for d in shifts)  # c's prompt was longer than the batch's position
    for rid, prompt in prompts.items():
        assert rec.tokens[rid] == _alone(engine, prompt), rid
        assert rec.finished[rid].reason == "length" and rec.finished[rid].completion_tokens == NEW


def test_a_full_cache_is_compacted_without_changing_tokens(tiny, shifts):
    """max_len 64 < everything the batch decodes: the rows shift left while others keep decoding."""
    engine = Engine.from_model(tiny)
    prompts = {"a": _prompt(3, 10), "b": _prompt(40, 12), "c": _prompt(80, 9)}
    plan = [("a", None, 0, GenRequest("a", prompts["a"], 40, "dense")),
            ("b", "a", 20, GenRequest("b", prompts["b"], 40, "dense")),
            ("c", "b", 20, GenRequest("c", prompts["c"], 40, "dense"))]
    rec = _run({"dense": Engine.from_model(tiny)}, plan, max_len=64)
    assert any(d < 0 for d in shifts)
    for rid, prompt in prompts.items():
        assert rec.tokens[rid] == _alone(engine, prompt, 40), rid


def test_sampled_request_with_a_seed_repeats_inside_a_batch(tiny):
    engine = Engine.from_model(tiny)
    sampling = SamplingConfig(temperature=1.0, seed=11)
    plan = [("a", None, 0, GenRequest("a", _prompt(1, 8), NEW, "dense")),
            ("s", "a", 4, GenRequest("s", _prompt(30, 8), NEW, "dense", sampling))]
    rec = _run({"dense": Engine.from_model(tiny)}, plan)
    assert rec.tokens["s"] == _alone(engine, _prompt(30, 8), sampling=sampling)


def test_two_arms_decode_side_by_side(tiny):
    """Each arm is its own engine over the same weights; a dense-policy arm matches the dense engine."""
    weights = Engine.from_model(tiny).w
    engines = {"dense": Engine(weights), "routed": Engine(weights, policy=ExecutionPolicy.always_dense())}
    plan = [("a", None, 0, GenRequest("a", _prompt(1, 12), NEW, "dense")),
            ("b", "a", 3, GenRequest("b", _prompt(5, 9), NEW, "routed"))]
    rec = _run(engines, plan)
    assert rec.tokens["a"] == _alone(engines["dense"], _prompt(1, 12))
    assert rec.tokens["b"] == _alone(engines["dense"], _prompt(5, 9))


def test_cancel_frees_the_row_for_the_next_request(tiny):
    rec = Recorder()
    rec.expected = 2
    sched = Scheduler({"dense": Engine.from_model(tiny)}, set(), 1, 4, 256, rec)
    rec.when("long", 3, lambda: sched.cancel("long"))
    sched.start()
    sched.submit(GenRequest("long", _prompt(1, 5), 200, "dense"))
    sched.submit(GenRequest("next", _prompt(2, 5), 5, "dense"))
    assert rec.done.wait(30)
    sched.stop()
    assert rec.finished["long"].reason == "cancelled" and rec.finished["long"].completion_tokens < 200
    assert rec.finished["next"].reason == "length" and len(rec.tokens["next"]) == 5


def test_stop_token_ends_a_sequence(tiny):
    engine = Engine.from_model(tiny)
    alone = _alone(engine, _prompt(1, 8))
    stop = alone[5]
    rec = Recorder()
    rec.expected = 1
    sched = Scheduler({"dense": engine}, {stop}, 2, 4, 256, rec)
    sched.start()
    sched.submit(GenRequest("a", _prompt(1, 8), NEW, "dense"))
    assert rec.done.wait(30)
    sched.stop()
    assert rec.tokens["a"] == alone[:alone.index(stop) + 1] and rec.finished["a"].reason == "stop"


def test_queue_bound_and_unknown_arm(tiny):
    sched = Scheduler({"dense": Engine.from_model(tiny)}, set(), 1, 2, 256, lambda events: None)
    for i in range(2):  # not started: everything waits
        sched.submit(GenRequest(str(i), [5, 6], 4, "dense"))
    with pytest.raises(QueueFull):
        sched.submit(GenRequest("x", [5, 6], 4, "dense"))
    with pytest.raises(ValueError, match="routed"):
        sched.submit(GenRequest("y", [5, 6], 4, "routed"))
