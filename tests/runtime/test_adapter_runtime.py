"""The runtime with routing adapters: every kernel path applies them on sparse steps only."""

import math

import torch

from adaroute.runtime import Engine, ExecutionPolicy
from adaroute.runtime.weights import RoutedFFN
from tests.routing.test_adapter import adapted_copy
from tests.runtime.test_engine import _fused_and_by_kernel, set_threshold

SEQ = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def decode(model, kernel, policy, fused=True):
    engine = Engine.from_model(model, kernel=kernel, policy=policy)
    if not fused:
        engine._fused = None
    cache = engine.new_cache(1, 8)
    return torch.stack([engine.forward(SEQ[:, i:i + 1], cache)[0] for i in range(SEQ.shape[1])])


def test_sparse_decode_with_adapters_matches_the_module():
    model, mods = adapted_copy(3)
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    sparse = ExecutionPolicy.always_sparse()
    ref = decode(model, "reference", sparse)
    for fused in (True, False):
        torch.testing.assert_close(decode(model, "cpu", sparse, fused), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the routed module's own masked forward, adapters applied, token by token
        hf = torch.stack([model(SEQ[:, :i + 1]).logits[0, -1] for i in range(SEQ.shape[1])])
    torch.testing.assert_close(ref[1:], hf[1:], rtol=1e-4, atol=1e-4)


def test_fused_step_with_adapters_equals_kernel_by_kernel():
    model, mods = adapted_copy(3)
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    fused, ref = _fused_and_by_kernel(model, ExecutionPolicy(sparse_max_tokens=2))
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    assert fused[2:] == ref[2:] and fused[3] > 0


def test_dense_steps_of_an_adapted_model_ignore_the_adapters():
    model, mods = adapted_copy(3)
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    dense = ExecutionPolicy.always_dense()
    with_adapters = {k: decode(model, k, dense) for k in ("reference", "cpu")}
    saved = [m.adapter for m in mods]
    for m in mods:
        m.adapter = None
    assert torch.equal(with_adapters["reference"], decode(model, "reference", dense))
    # the CPU kernel's thread-parallel sums vary in the last bits from run to run, adapters or not
    torch.testing.assert_close(with_adapters["cpu"], decode(model, "cpu", dense), rtol=1e-5, atol=1e-5)
    for m, a in zip(mods, saved, strict=True):
        m.adapter = a


def test_byte_model_counts_the_adapter():
    model, mods = adapted_copy(3)
    engine = Engine.from_model(model, kernel="reference")
    f = next(ly.ffn for ly in engine.w.layers if isinstance(ly.ffn, RoutedFFN))
    r, hidden, units = f.adapter.rank, f.w_gate.shape[1], f.w_gate.shape[0]
    bytes_ = engine.w.weight_bytes(0.5)
    assert bytes_["adapter"] == len(mods) * 4 * (3 * r * hidden + int(0.5 * 3 * units * r))
    assert engine.w.weight_bytes(None)["adapter"] == 0  # dense steps read no adapter
    shadow = sum(t.numel() * t.element_size() for t in (*f.shadow_tensors(), f.unit_bias))  # as held
    assert math.isclose(f.router_share * 3 * units * hidden * 4, shadow + 4 * 3 * r * hidden)
