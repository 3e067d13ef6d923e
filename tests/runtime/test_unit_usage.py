"""``Engine.unit_usage``: per layer and unit, the tokens that selected it while the layer ran sparse.
The fused CPU step, the kernel-by-kernel path (CPU and reference kernels) and the reference selection
recomputed on the same FFN inputs must count the same, and dense layers and dense calls nothing."""

import collections
import math

import pytest
import torch

from adaroute.kernels import cpu, reference
from adaroute.routing import route_model
from adaroute.runtime import Engine, ExecutionPolicy
from adaroute.runtime.weights import RoutedFFN
from tests.fixtures import make_tiny_llama

STEPS = 5  # decode steps after the prefill
SPARSE_MAX = 3  # tokens in flight up to which routed layers run sparse


@pytest.fixture(scope="module")
def routed():
    """The tiny model with layer 0 routed (guards that bind for some tokens) and layer 1 dense."""
    model = make_tiny_llama(seed=3)
    (mod,) = route_model(model, layers=[0])
    mod.threshold, mod.min_units, mod.max_units = -6.0, 24, 100
    return model


class RecordingKernel:
    """The CPU kernels; each routed call also recomputes its selection with the reference on the same
    input and sums it per layer (the ground truth the engine's counter is compared with)."""

    def __init__(self, engine_layers):
        self.layer_of = {ly.ffn.unit_bias.data_ptr(): i for i, ly in enumerate(engine_layers)
                         if isinstance(ly.ffn, RoutedFFN)}
        self.masks: dict[int, torch.Tensor] = collections.defaultdict(int)

    def __getattr__(self, name):
        return getattr(cpu, name)

    def routed_ffn(self, x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold, min_units,
                   max_units, residual=None, adapter=None, usage=None, scoring_copy=True):
        scores = reference.router_scores(x, shadow_q, shadow_scale, unit_bias)
        mask = reference.select_units(scores, threshold, min_units, max_units)  # [T, F]
        self.masks[self.layer_of[unit_bias.data_ptr()]] += mask.sum(0)
        return cpu.routed_ffn(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold, min_units,
                              max_units, residual, adapter, usage, scoring_copy)


def new_engine(model, path: str, failsafe: bool = True) -> Engine:
    engine = Engine.from_model(model, kernel="reference" if path == "reference" else "cpu",
                               policy=ExecutionPolicy(sparse_max_tokens=SPARSE_MAX))
    if path == "recorded":
        engine.kernel = RecordingKernel(engine.w.layers)
    if path != "fused":
        engine._fused = None
    else:
        assert engine._fused is not None
    if not failsafe:
        engine.failsafe = None
    engine.record_units = True
    engine.start_unit_usage()
    return engine


def decode(engine: Engine, batch: int) -> list[torch.Tensor]:
    """A dense prefill of 4 tokens per sequence, then STEPS decode steps of ``batch`` tokens; returns
    the counter after the prefill and after each step."""
    g = torch.Generator().manual_seed(batch)
    cache = engine.new_cache(batch, 4 + STEPS)
    engine.forward(torch.randint(2, 300, (batch, 4), generator=g), cache)
    seen = [engine.unit_usage.clone()]
    for _ in range(STEPS):
        engine.forward(torch.randint(2, 300, (batch, 1), generator=g), cache)
        step = engine.unit_usage - seen[-1]  # [L, F]
        events = engine.last_failsafe
        if events is None or not bool(events.any()):  # else counts say F for tokens recomputed densely
            assert torch.equal(step.sum(1), engine.last_units.clamp_min(0).sum(1))  # [L]
        seen.append(engine.unit_usage.clone())
    return seen


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_fused_and_kernel_paths_count_the_reference_selection(routed, batch):
    recorder = new_engine(routed, "recorded")
    expect = decode(recorder, batch)
    truth = recorder.kernel.masks[0]
    assert torch.equal(expect[-1][0], truth)
    assert int(truth.sum()) > 0 and bool((expect[0] == 0).all())  # sparse steps counted, the prefill not
    assert bool((expect[-1][1] == 0).all())  # layer 1 is dense
    for path in ("fused", "by kernel", "reference"):
        for failsafe in (True, False):
            got = decode(new_engine(routed, path, failsafe), batch)
            for a, b in zip(got, expect, strict=True):
                assert torch.equal(a, b), (path, failsafe)


def test_failsafe_counts_the_routers_selection(routed):
    """Tokens the fail-safe recomputes densely (here: a band no selection fits) still count what the
    router selected, in the fused step as in the kernel path; counts report them as every unit."""
    results = []
    for path in ("fused", "recorded"):
        engine = new_engine(routed, path)
        engine.failsafe.bands()[0] = (0, 1)  # every selection leaves the band
        usage = decode(engine, 2)[-1]
        assert bool((engine.last_failsafe[0] == 1).all())
        assert bool((engine.last_units[0] == engine.w.layers[0].ffn.w_gate.shape[0]).all())
        results.append(usage)
    assert torch.equal(results[0][0], engine.kernel.masks[0])
    assert torch.equal(results[0], results[1])


def test_dense_calls_add_nothing(routed):
    mod = routed.model.layers[0].mlp
    saved = mod.threshold, mod.max_units
    for path in ("fused", "by kernel"):
        engine = new_engine(routed, path)
        engine.policy = ExecutionPolicy.always_dense()
        assert not bool(decode(engine, 2)[-1].any())
        engine = new_engine(routed, path)  # sparse policy, but every unit selected: the dense FFN runs
        mod.threshold, mod.max_units = -math.inf, mod.units
        try:
            assert not bool(decode(engine, 1)[-1].any())
        finally:
            mod.threshold, mod.max_units = saved


def test_usage_is_off_by_default_and_checked(routed):
    engine = Engine.from_model(routed, kernel="cpu")
    assert engine.unit_usage is None
    assert engine.start_unit_usage() is engine.unit_usage and engine.unit_usage.shape == (2, 128)
    engine.unit_usage = None
    i64 = torch.int64
    for bad in (torch.zeros(2, 128), torch.zeros(1, 128, dtype=i64), torch.zeros(128, 2, dtype=i64).t()):
        with pytest.raises(ValueError, match=r"unit_usage must be a contiguous int64 tensor of shape \(2, 128\)"):
            engine.unit_usage = bad
