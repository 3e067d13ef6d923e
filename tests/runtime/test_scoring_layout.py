"""The routers' shadows held in the compiled step's scoring layout (g16) instead of rows."""

import pytest
import torch

from adaroute.config import RoutingConfig
from adaroute.kernels import cpu
from adaroute.routing import load_routed, save_routed
from adaroute.runtime import Engine, ExecutionPolicy, cost
from adaroute.runtime.checkpoint import load_weights
from adaroute.runtime.formats import runtime_weights
from adaroute.runtime.fused_cpu import scoring_layout
from adaroute.runtime.weights import RoutedFFN, from_model
from tests.fixtures import make_tiny_tokenizer
from tests.routing.test_adapter import adapted_copy

pytestmark = pytest.mark.skipif(not cpu.scores_from_g16(), reason="the kernels here score from rows (no AVX-512 BW)")


@pytest.fixture
def tiny_ids():
    return torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(7))


def _routed(w):
    return [ly.ffn for ly in w.layers if isinstance(ly.ffn, RoutedFFN)]


@pytest.mark.parametrize("units,hidden,groups", [(1536, 576, 18), (40, 64, 2), (17, 96, 3)])
def test_rows_made_from_g16_are_the_rows_it_was_made_from(units, hidden, groups):
    g = torch.Generator().manual_seed(units)
    q = torch.randint(0, 256, (2 * units, hidden // 2), dtype=torch.uint8, generator=g)
    s = torch.rand(2 * units, groups, generator=g)
    packed = cpu.shadow_g16(q, s).clone()  # a tensor of its own, as scoring_layout's weights hold it
    q2, s2 = cpu.rows_from_g16(packed, units, hidden, groups)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    assert cpu.rows_from_g16(packed, units, hidden, groups)[0] is q2  # made once per g16 tensor
    assert cpu.shadow_g16(q2, s2) is packed  # and scoring those rows reads the held tensor, not a copy


def test_weights_hold_g16_alone_and_read_the_same_bytes():
    model, _ = adapted_copy(2)
    rows = from_model(model)
    held = scoring_layout(rows)
    for a, b in zip(_routed(rows), _routed(held), strict=True):
        assert b.shadow_g16 is not None and b.shadow_q.numel() == 0 and b.shadow_scale.numel() == 0
        assert b.int4_shadow and torch.equal(b.shadow_g16, cpu.shadow_g16(a.shadow_q, a.shadow_scale))
        q, s = b.shadow_rows()
        assert torch.equal(q, a.shadow_q) and torch.equal(s, a.shadow_scale)
        assert cost.ffn_cost(a, 0.4) == cost.ffn_cost(b, 0.4)  # 16 | F: g16 has no padding
    size = [cost.distinct_bytes(cost.held_tensors(w, True)) for w in (rows, held)]
    assert size[0] == size[1]
    assert cost.scoring_copy_bytes(held) == 0 and cost.scoring_copy_fits(held)
    assert Engine(held).made_tensors == []  # the step scores the weights' g16, no copy beside them
    assert runtime_weights(model, None).layers[0].ffn.shadow_g16 is not None  # the runtime's float32 weights


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_decoding_from_g16_alone_is_decoding_from_rows(kernel, tiny_ids):
    model, _ = adapted_copy(3)
    rows = from_model(model)
    outputs = []
    for w, copy in ((rows, True), (scoring_layout(rows), True), (rows, False)):
        engine = Engine(w, kernel=kernel, policy=ExecutionPolicy.always_sparse())
        if kernel == "cpu" and not copy:  # scored from the rows
            engine.scoring_copy = False
            engine._fused = type(engine._fused).build(w, False)
        if kernel == "cpu":
            assert engine._fused is not None
        engine.record_units = True
        cache = engine.new_cache(1, tiny_ids.shape[1])
        steps = [engine.forward(tiny_ids[:, i:i + 1], cache) for i in range(tiny_ids.shape[1])]
        outputs.append((torch.stack(steps), engine.last_units))
    (ref, ref_units), (got, got_units), (by_rows, _) = outputs
    assert torch.equal(got_units, ref_units)
    # the threads' partial sums may meet in another order from call to call (see test_adapter_runtime)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_rows, ref, rtol=1e-4, atol=1e-4)


def test_a_float32_directory_loads_its_routers_as_g16(tmp_path, tiny_ids):
    model, _ = adapted_copy(4)
    save_routed(model, make_tiny_tokenizer(), tmp_path, "tiny", RoutingConfig())
    w = load_weights(tmp_path)
    assert all(f.shadow_g16 is not None and f.shadow_q.numel() == 0 for f in _routed(w))
    loaded, _ = load_routed(tmp_path)  # the same directory as a model: the same routed head
    a, b = (Engine(x, policy=ExecutionPolicy.always_sparse()) for x in (w, runtime_weights(loaded, None)))
    for e in (a, b):
        e.record_units = True
    ca, cb = a.new_cache(1, tiny_ids.shape[1]), b.new_cache(1, tiny_ids.shape[1])
    for i in range(tiny_ids.shape[1]):
        x, y = a.forward(tiny_ids[:, i:i + 1], ca), b.forward(tiny_ids[:, i:i + 1], cb)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.last_units, b.last_units)
