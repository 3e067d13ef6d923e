"""Equivalences that carry the runtime: transformers' greedy tokens, cached == full forward,
batched == one at a time, routed at density 1.0 == dense, sparse kernel == reference."""

import math

import pytest
import torch

from adaroute.runtime import Engine, ExecutionPolicy, generate
from tests.fixtures import make_tiny_llama

PROMPTS = [[5, 9, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48], [200], [7, 300, 12, 88, 2]]


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers(tiny, kernel_name):
    engine = Engine.from_model(tiny, kernel=kernel_name)
    for prompt in PROMPTS:
        assert generate(engine, [prompt], 32).tokens[0] == hf_greedy(tiny, prompt, 32)


def test_cached_decode_equals_full_forward(tiny, kernel_name):
    engine = Engine.from_model(tiny, kernel=kernel_name)
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    cache = engine.new_cache(1, 16)
    full = engine.forward(seq, cache, all_logits=True)[0]  # [T, V]
    cache = engine.new_cache(1, 16)
    engine.forward(seq[:, :4], cache)
    steps = [engine.forward(seq[:, i:i + 1], cache)[0] for i in range(4, seq.shape[1])]
    torch.testing.assert_close(torch.stack(steps), full[4:], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hf = tiny(seq).logits[0]
    torch.testing.assert_close(full, hf, rtol=1e-4, atol=1e-4)


def test_batched_decode_equals_one_at_a_time(tiny, kernel_name):
    engine = Engine.from_model(tiny, kernel=kernel_name)
    batched = generate(engine, PROMPTS, 12).tokens
    assert batched == [generate(engine, [p], 12).tokens[0] for p in PROMPTS]


def test_stop_tokens_end_each_sequence(tiny):
    engine = Engine.from_model(tiny, kernel="reference")
    free = generate(engine, PROMPTS[:2], 10).tokens
    stop = free[0][3]
    out = generate(engine, PROMPTS[:2], 10, stop_tokens=[stop])
    assert out.tokens[0] == free[0][:free[0].index(stop) + 1] and out.finish_reasons[0] == "stop"
    assert len(out.step_s) <= 9


def test_cache_overflow_is_an_error(tiny):
    engine = Engine.from_model(tiny, kernel="cpu")
    cache = engine.new_cache(1, 4)
    engine.forward(torch.tensor([[1, 2, 3, 4]]), cache)
    with pytest.raises(ValueError, match="KV cache full"):
        engine.forward(torch.tensor([[5]]), cache)


@pytest.fixture(scope="module")
def routed():
    routing = pytest.importorskip("adaroute.routing")
    model = make_tiny_llama(seed=3)
    mods = routing.route_model(model)
    return model, mods


def set_threshold(mods, threshold, min_units=0, max_units=None):
    for m in mods:
        m.threshold, m.min_units, m.max_units = threshold, min_units, m.units if max_units is None else max_units


def test_routed_at_density_one_equals_dense(tiny, routed, kernel_name):
    model, mods = routed
    set_threshold(mods, -math.inf)
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    dense = Engine.from_model(tiny, kernel=kernel_name)
    sparse = Engine.from_model(model, kernel=kernel_name, policy=ExecutionPolicy.always_sparse())
    for engine in (dense, sparse):
        engine.logits = engine.forward(seq, engine.new_cache(1, 8), all_logits=True)
    torch.testing.assert_close(sparse.logits, dense.logits, rtol=1e-4, atol=1e-4)


def test_routed_sparse_decode_matches_reference_and_module(routed):
    model, mods = routed
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = {}
    for name in ("reference", "cpu"):
        engine = Engine.from_model(model, kernel=name, policy=ExecutionPolicy.always_sparse())
        cache = engine.new_cache(1, 8)
        logits[name] = torch.stack([engine.forward(seq[:, i:i + 1], cache)[0] for i in range(seq.shape[1])])
    torch.testing.assert_close(logits["cpu"], logits["reference"], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the routed module's own masked forward, token by token through transformers
        hf = torch.stack([model(seq[:, :i + 1]).logits[0, -1] for i in range(seq.shape[1])])
    torch.testing.assert_close(logits["reference"][1:], hf[1:], rtol=1e-4, atol=1e-4)


def test_original_layout_is_the_dense_model(tiny, routed, kernel_name):
    """The baseline bench measures a routed model against: its FFNs back in the dense layout (copies,
    the same values), exact head; logits equal the original dense model's and the routed dense arm's."""
    from adaroute.runtime.weights import DenseFFN, RoutedFFN, from_model, original_layout

    model, mods = routed
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    w = from_model(model)
    orig = original_layout(w)
    assert all(isinstance(ly.ffn, DenseFFN) for ly in orig.layers) and orig.routed_head is None
    assert all(isinstance(ly.ffn, RoutedFFN) for ly in w.layers)  # the routed weights are left as they were
    for a, b in zip(orig.layers, w.layers, strict=True):
        assert a.ffn.w_down.is_contiguous() and torch.equal(a.ffn.w_down, b.ffn.w_down_t.T)
        assert a.ffn.w_gate.data_ptr() != b.ffn.w_gate.data_ptr()
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    out = {}
    for name, weights in (("original", orig), ("dense arm", w), ("tiny", from_model(tiny))):
        engine = Engine(weights, kernel=kernel_name, policy=ExecutionPolicy.always_dense())
        out[name] = engine.forward(seq, engine.new_cache(1, 8), all_logits=True)
    torch.testing.assert_close(out["original"], out["tiny"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["original"], out["dense arm"], rtol=1e-5, atol=1e-5)


def test_policy_picks_dense_for_prefill_and_counts_units(routed):
    from adaroute.runtime import UnitCounter

    model, mods = routed
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    engine = Engine.from_model(model, kernel="cpu", policy=ExecutionPolicy(sparse_max_tokens=2))
    engine.counter = UnitCounter()
    cache = engine.new_cache(1, 8)
    engine.forward(torch.tensor([[1, 2, 3, 4]]), cache)
    assert engine.counter.slots == 0  # four tokens in flight: dense
    engine.forward(torch.tensor([[5]]), cache)
    assert 0 < engine.counter.density < 1


def test_policy_validates():
    with pytest.raises(ValueError, match="sparse_max_tokens"):
        ExecutionPolicy(-1)
    assert ExecutionPolicy(4).sparse(4) and not ExecutionPolicy(4).sparse(5)


def test_unit_packed_routed_weights_are_shared_not_copied(routed):
    """Routed modules own one [F, 3, H] store; the runtime keeps its views (no copy) and the sparse
    kernels read them through the 3H row stride, giving the same logits as contiguous copies."""
    import copy

    from adaroute.kernels import reference
    from adaroute.runtime.weights import RoutedFFN

    model, mods = routed
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    engine = Engine.from_model(model, kernel="cpu", policy=ExecutionPolicy.always_sparse())
    ffns = [ly.ffn for ly in engine.w.layers if isinstance(ly.ffn, RoutedFFN)]
    assert ffns and all(reference.is_unit_packed(f.w_gate, f.w_up, f.w_down_t) for f in ffns)
    assert ffns[0].w_gate.data_ptr() == ffns[0].module.w_units.data_ptr()

    contiguous = copy.deepcopy(model)  # the same weights as three separate contiguous [F, H] tensors
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = {}
    for label, mdl in (("packed", model), ("contiguous", contiguous)):
        eng = Engine.from_model(mdl, kernel="cpu", policy=ExecutionPolicy.always_sparse())
        if label == "contiguous":
            eng = _with_contiguous_ffn_weights(eng)
        cache = eng.new_cache(1, 8)
        logits[label] = torch.stack([eng.forward(seq[:, i:i + 1], cache)[0] for i in range(seq.shape[1])])
    torch.testing.assert_close(logits["packed"], logits["contiguous"], rtol=1e-5, atol=1e-5)


def _with_contiguous_ffn_weights(engine):
    import dataclasses

    from adaroute.runtime.weights import RoutedFFN

    for i, ly in enumerate(engine.w.layers):
        if isinstance(ly.ffn, RoutedFFN):
            f = ly.ffn
            ffn = dataclasses.replace(f, w_gate=f.w_gate.contiguous(), w_up=f.w_up.contiguous(),
                                      w_down_t=f.w_down_t.contiguous())
            engine.w.layers[i] = dataclasses.replace(ly, ffn=ffn)
    return engine


def _fused_and_by_kernel(model, policy):
    """Logits of a padded prefill and four 2-sequence decode steps, the cache and the unit counts,
    from the fused CPU step and from the kernel-by-kernel path."""
    from adaroute.runtime import UnitCounter

    results = {}
    for label in ("fused", "by kernel"):
        engine = Engine.from_model(model, kernel="cpu", policy=policy)
        assert engine._fused is not None
        if label == "by kernel":
            engine._fused = None
        engine.counter = UnitCounter()
        cache = engine.new_cache(2, 12, pad=torch.tensor([2, 0]))
        steps = [engine.forward(torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]), cache)]  # prefill, 8 tokens
        steps += [engine.forward(torch.tensor([[11 + i], [40 + i]]), cache) for i in range(4)]  # 2 in flight
        results[label] = (torch.stack(steps), cache.k.clone(), engine.counter.units, engine.counter.slots)
    return results["fused"], results["by kernel"]


@pytest.mark.parametrize("which", ["dense", "routed"])
def test_fused_decode_step_equals_kernel_by_kernel(tiny, routed, which):
    """The CPU library's one-call decode step runs the same kernels as Engine._layer: same logits,
    same unit counts, same cache, for padded batches and for prefill + decode."""
    model, mods = routed
    set_threshold(mods, -6.0, min_units=8, max_units=100)
    fused, ref = _fused_and_by_kernel(tiny if which == "dense" else model, ExecutionPolicy(sparse_max_tokens=2))
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-5)
    assert fused[2:] == ref[2:]
    assert (fused[3] > 0) == (which == "routed")


@pytest.fixture
def profiled(routed):
    """The routed tiny model with a calibrated-looking profile per layer, layer 0 at density 0.2 and
    layer 1 at 0.6 (so at two tokens in flight the default policy runs layer 0 sparse, layer 1 dense)."""
    from adaroute.routing.profile import PROFILE_GRID, LayerProfile

    model, mods = routed
    grid = list(PROFILE_GRID)
    set_threshold(mods, 0.0, min_units=8, max_units=100)
    for m, density in zip(mods, (0.2, 0.6), strict=True):
        m.profile = LayerProfile(grid, [2.0 - 0.3 * i for i in range(len(grid) - 1)] + [-math.inf],
                                 [0.0] * len(grid), density, "adaptive", 0, m.units)
        m.threshold = m.profile.threshold_at(density)
    yield model, mods
    for m in mods:
        m.profile = None


def test_fused_step_applies_per_layer_limits_like_the_kernel_path(profiled):
    model, mods = profiled
    fused, ref = _fused_and_by_kernel(model, ExecutionPolicy(None))
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    assert fused[2:] == ref[2:]
    assert fused[3] == 4 * 2 * mods[0].units  # 4 steps x 2 tokens: only layer 0 ran sparse at 2 in flight


def test_default_policy_models_the_crossover_per_layer():
    from adaroute.runtime.policy import sparse_byte_share

    policy = ExecutionPolicy(None)
    assert sparse_byte_share(0.35, 2, 0.105) == pytest.approx(1 - 0.65 ** 2 + 0.21)
    # low density: two tokens still read well under the dense bytes; 0.5: not by enough; 0.9: never
    assert policy.layer_max_tokens(0.35, 0.105) == 2
    assert policy.layer_max_tokens(0.2, 0.105) == 3
    assert policy.layer_max_tokens(0.5, 0.105) == 1
    assert policy.layer_max_tokens(0.9, 0.105) == 1  # one token in flight is always sparse
    assert policy.layer_max_tokens(None, 0.105) == 1  # density unknown: decode only
    assert ExecutionPolicy(3).layer_max_tokens(0.9, 0.105) == 3  # a fixed crossover wins


def test_engine_limits_follow_each_layers_threshold(profiled):
    model, mods = profiled
    engine = Engine.from_model(model, kernel="cpu", policy=ExecutionPolicy(None))
    share = engine.w.layers[0].ffn.router_share
    assert engine.sparse_limits() == [ExecutionPolicy(None).layer_max_tokens(0.2, share),
                                      ExecutionPolicy(None).layer_max_tokens(0.6, share)]
    assert engine.sparse_limits()[0] > 1 and engine.sparse_limits()[1] == 1
    mods[1].threshold = mods[1].profile.threshold_at(0.2)  # a density override is seen at once
    assert engine.sparse_limits()[1] == engine.sparse_limits()[0]


def test_unit_counter_sums_compiled_steps_when_read():
    from adaroute.runtime import UnitCounter

    counter = UnitCounter()
    step = torch.tensor([[3, 5], [-1, -1], [2, 0]])  # [L, N]: layer 1 ran dense
    for _ in range(UnitCounter._FOLD + 3):  # past one fold
        counter.add_step(step, 10)
    scratch = step.clone()
    counter.add_step(scratch, 10)
    scratch.fill_(99)  # written after the step was handed in: not counted
    steps = UnitCounter._FOLD + 4
    assert counter.units == steps * (3 + 5 + 2 + 0)
    assert counter.slots == steps * 2 * 2 * 10  # two sparse layers x two tokens x width
    counter.add(torch.tensor([4, 4]), 10)  # the per-layer path adds to the same sums
    assert counter.units == steps * 10 + 8 and counter.density == counter.units / counter.slots
