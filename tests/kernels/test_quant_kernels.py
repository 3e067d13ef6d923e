"""Compiled block-quantised products against ``quant_reference`` on random and real blocks, in both
layouts (GGUF's rows, and g16 with int16 activations).

Tolerance: both compute the reference's product (float32 activations for rows, the same int16
rounding for g16) summed in another order (16 lanes, several accumulators, fused multiply-adds), so
they agree to float rounding: 1e-5 relative to the output's magnitude."""

import gguf
import numpy as np
import pytest
import torch

from adaroute.kernels import cpu, quant_cpu
from adaroute.kernels import quant_reference as qr
from tests.kernels.test_quant_reference import embedded_gguf


@pytest.fixture(scope="module", autouse=True)
def native():
    assert cpu.uses_native() and quant_cpu._lib() is not None, "the compiled CPU kernels did not build"


def close(a: torch.Tensor, b: torch.Tensor):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("layout", ["rows", "g16"])
@pytest.mark.parametrize("fmt", qr.FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 5, 9, 70])
def test_linear_matches_reference(fmt, tokens, layout):
    g = torch.Generator().manual_seed(tokens)
    w = qr.quantize(torch.randn(77, 96, generator=g) * 0.1, fmt)  # 77 rows: a padded last group
    w = qr.pack16(w) if layout == "g16" else w
    x = torch.randn(tokens, 96, generator=g)
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    close(quant_cpu.linear(x, w), qr.linear(x, w))
    res, expect = torch.randn(tokens, 77, generator=g), None
    expect = qr.linear(x, w, residual=res.clone())
    assert quant_cpu.linear(x, w, residual=res) is res
    close(res, expect)


@pytest.mark.parametrize("pack", [lambda w: w, qr.pack16])
@pytest.mark.parametrize("tokens", [1, 4])
def test_multi_and_ffn_match_reference(tokens, pack):
    g = torch.Generator().manual_seed(7)
    wq, wk = (pack(qr.quantize(torch.randn(m, 64, generator=g), f)) for m, f in ((64, "q4_1"), (32, "q8_0")))
    x = torch.randn(tokens, 64, generator=g)
    close(quant_cpu.linear_multi(x, [wq, wk]), torch.cat([qr.linear(x, wq), qr.linear(x, wk)], dim=1))
    gate, up = (pack(qr.quantize(torch.randn(96, 64, generator=g), "q4_0")) for _ in range(2))
    down = pack(qr.quantize(torch.randn(64, 96, generator=g), "q8_0"))
    expect = qr.linear(torch.nn.functional.silu(qr.linear(x, gate)) * qr.linear(x, up), down)
    close(quant_cpu.dense_ffn(x, gate, up, down), expect)


@pytest.mark.slow
def test_real_blocks_of_the_embedded_file():
    reader = gguf.GGUFReader(embedded_gguf())
    tensors = {t.name: t for t in reader.tensors}
    g = torch.Generator().manual_seed(0)
    for name in ("token_embd.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"):
        t = tensors[name]
        w = qr.QuantWeight(torch.from_numpy(np.asarray(t.data[:512]).copy()), t.tensor_type.name.lower(),
                           int(t.shape[0]))
        x = torch.randn(3, w.cols, generator=g)
        close(quant_cpu.linear(x, w), qr.linear(x, w))
        packed = qr.pack16(w)
        close(quant_cpu.linear(x, packed), qr.linear(x, packed))


@pytest.mark.parametrize("fmt", qr.FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 70])
@pytest.mark.parametrize("guards", [(0, 96), (40, 96), (0, 10)])
def test_routed_units_match_reference(fmt, tokens, guards):
    """Quantised unit-packed units, int4-shadow scores, threshold and min/max guards == the float
    reference on the dequantised units."""
    from adaroute.kernels import reference
    from tests.kernels.test_kernels import gap_threshold, routed_tensors

    t = routed_tensors(tokens)
    store = torch.stack([qr.quantize(t[k], fmt).data for k in ("w_gate", "w_up", "w_down_t")], dim=1)
    units = [qr.QuantWeight(store[:, k], fmt, 64) for k in range(3)]
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(9))
    scores = reference.router_scores(x, t["shadow_q"], t["shadow_scale"], t["unit_bias"])
    threshold = gap_threshold(scores, 0.4)
    router = (t["shadow_q"], t["shadow_scale"], t["unit_bias"], threshold, *guards)
    y, counts = quant_cpu.routed_ffn(x, *units, *router)
    y_ref, counts_ref = reference.routed_ffn(x, *(u.dequantize() for u in units), *router)
    assert torch.equal(counts, counts_ref)
    close(y, y_ref)
    res = torch.randn(tokens, 64)
    expect = reference.unit_ffn(x, *(u.dequantize() for u in units), residual=res.clone())
    close(quant_cpu.unit_ffn(x, *units, residual=res), expect)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_exact_router_matches_reference(fmt, tokens):
    """No shadow: scores from exact gate/up, the selection policy, only the selected down rows."""
    from adaroute.kernels import reference
    from tests.kernels.test_kernels import gap_threshold, routed_tensors

    t = routed_tensors(tokens + 10)
    units = [qr.quantize(t[k], fmt) for k in ("w_gate", "w_up", "w_down_t")]
    floats = [u.dequantize() for u in units]
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(5))
    scores = qr.exact_scores(x, *floats[:2], t["unit_bias"])
    threshold = gap_threshold(scores, 0.5)
    empty = t["shadow_q"][:0], t["shadow_scale"][:0]
    y, counts = quant_cpu.routed_ffn(x, *units, *empty, t["unit_bias"], threshold, 4, 90)
    mask = reference.select_units(scores, threshold, 4, 90)
    assert torch.equal(counts, mask.sum(-1))
    close(y, reference.unit_ffn(x, *floats, mask))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_exact_router_on_g16_gate_up_matches_reference(fmt, tokens):
    """The exact router with gate/up in the g16 layout (int16 activations, as the dense g16 kernels)
    and down rows by unit: scores, selection and output == the reference on the rounded activations;
    with every unit, the dense pass of the same layout."""
    from adaroute.kernels import reference
    from tests.kernels.test_kernels import gap_threshold, routed_tensors

    t = routed_tensors(tokens + 20)
    gate, up, down_t = (qr.quantize(t[k], fmt) for k in ("w_gate", "w_up", "w_down_t"))
    units = [qr.pack16(gate), qr.pack16(up), down_t]
    floats = [u.dequantize() for u in units]
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(6))
    xr = qr.round_activations(x)
    scores = qr.exact_scores(xr, *floats[:2], t["unit_bias"])
    threshold = gap_threshold(scores, 0.5)
    empty = t["shadow_q"][:0], t["shadow_scale"][:0]
    usage = torch.zeros(units[0].shape[0], dtype=torch.int64)
    y, counts = quant_cpu.routed_ffn(x, *units, *empty, t["unit_bias"], threshold, 4, 90, usage=usage)
    mask = reference.select_units(scores, threshold, 4, 90)
    assert torch.equal(counts, mask.sum(-1)) and torch.equal(usage, mask.sum(0))
    close(y, reference.unit_ffn(xr, *floats, mask))
    close(quant_cpu.unit_ffn(x, *units), reference.unit_ffn(xr, *floats))
    with pytest.raises(ValueError, match="exact router"):
        quant_cpu.routed_ffn(x, *units, t["shadow_q"], t["shadow_scale"], t["unit_bias"], threshold, 4, 90)


@pytest.mark.parametrize("layout", ["rows", "g16"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_exact_router_applies_routing_adapters(layout, tokens):
    """Routing adapters on quantised units (exact router): the selection comes from the base gate/up,
    the adapter corrects the selected units only, as ``reference.unit_ffn`` with the mask; the dense
    pass (every unit) stays the base FFN."""
    from adaroute.kernels import reference
    from tests.kernels.test_adapter_kernels import adapter
    from tests.kernels.test_kernels import gap_threshold, routed_tensors

    t = routed_tensors(tokens + 30)
    units = [qr.quantize(t[k], "q8_0") for k in ("w_gate", "w_up", "w_down_t")]
    if layout == "g16":
        units[:2] = [qr.pack16(u) for u in units[:2]]
    floats = [u.dequantize() for u in units]
    a = quant_cpu.float_adapter(quant_cpu.half_adapter(adapter(seed=tokens, rank=4)))  # the kernels' float16
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(8))
    xr = qr.round_activations(x) if layout == "g16" else x
    scores = qr.exact_scores(xr, *floats[:2], t["unit_bias"])
    threshold = gap_threshold(scores, 0.5)
    empty = t["shadow_q"][:0], t["shadow_scale"][:0]
    y, counts = quant_cpu.routed_ffn(x, *units, *empty, t["unit_bias"], threshold, 4, 90, adapter=a)
    mask = reference.select_units(scores, threshold, 4, 90)
    assert torch.equal(counts, mask.sum(-1))
    expect = reference.unit_ffn(xr, *floats, mask, adapter=a)
    close(y, expect)
    assert not torch.allclose(expect, reference.unit_ffn(xr, *floats, mask), atol=1e-3)  # the adapter did it
    close(quant_cpu.unit_ffn(x, *units), reference.unit_ffn(xr, *floats))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("tokens", [1, 5])
def test_exact_router_with_the_whole_down_projection_matches_reference(fmt, rank, tokens):
    """The runtime's layout for the exact router: g16 gate/up and the down projection [H, F] in g16,
    applied to the activations with the unselected units' zeroed (rounded per block of 32 units, as
    every g16 product); the adapter's down term on the unrounded activations, as the kernel sums it."""
    import torch.nn.functional as F

    from adaroute.kernels import reference
    from tests.kernels.test_adapter_kernels import adapter
    from tests.kernels.test_kernels import gap_threshold, routed_tensors

    t = routed_tensors(tokens + 40)
    gate, up = (qr.pack16(qr.quantize(t[k], fmt)) for k in ("w_gate", "w_up"))
    down = qr.pack16(qr.quantize(t["w_down_t"].t().contiguous(), fmt))  # [H, F]
    a = quant_cpu.float_adapter(quant_cpu.half_adapter(adapter(seed=tokens, rank=rank))) if rank else None
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(9))
    xr = qr.round_activations(x)
    scores = qr.exact_scores(xr, gate.dequantize(), up.dequantize(), t["unit_bias"])
    threshold = gap_threshold(scores, 0.5)
    empty = t["shadow_q"][:0], t["shadow_scale"][:0]
    y, counts = quant_cpu.routed_ffn(x, gate, up, down, *empty, t["unit_bias"], threshold, 4, 90, adapter=a)
    mask = reference.select_units(scores, threshold, 4, 90)
    assert torch.equal(counts, mask.sum(-1))
    g, u = reference.adapted_gate_up(xr, gate.dequantize(), up.dequantize(), a)
    act = F.silu(g) * u * mask  # [T, F]
    expect = qr.linear(act, down)
    if a is not None:
        expect = expect + F.linear(act @ a.w_units[:, 2], a.w_out)
    close(y, expect)
    dense = F.silu(xr @ gate.dequantize().T) * (xr @ up.dequantize().T)
    close(quant_cpu.unit_ffn(x, gate, up, down), qr.linear(dense, down))  # every unit: the base FFN
