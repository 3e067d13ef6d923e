"""Block-quantised weights as GGUF stores them, and the product the quantised kernels compute.

Shape letters:
    T  tokens in flight     M  output rows     K  input length (a multiple of 32)
    B  blocks per row (K / 32)                 J  bytes per block

A quantised weight is the GGUF tensor's own bytes, [M, B * J] uint8, one row of blocks per output
row, never unpacked in memory. The block layouts (ggml's, little-endian, scales float16):

    q8_0   J = 34   d, then 32 int8 codes q                   w = d * q
    q4_0   J = 18   d, then 16 bytes of nibbles              w = d * (n - 8)
    q4_1   J = 20   d, m, then 16 bytes of nibbles           w = d * n + m

Nibble order: byte j of a block holds element j in its low nibble and element j + 16 in its high.

The product is ``x @ dequantize(w)^T`` in float32: activations are not quantised, so a model run
on its blocks computes what its dequantised float32 twin computes, up to float summation order.
(llama.cpp quantises activations to int8 per block of 32 as well; on the embedded model that moved
perplexity by 0.16 %, more than this runtime's 0.1 % budget for running a file's own blocks.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
FORMATS = tuple(BLOCK_BYTES)
# gguf.GGMLQuantizationType names of the formats (the package's own enum, looked up lazily)
GGML_NAMES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
_ROW_CHUNK = 4096  # rows unpacked at a time by the reference product (bounds its temporary memory)


@dataclass(frozen=True)
class QuantWeight:
    """A [M, K] weight held as GGUF blocks: ``data`` [M, K/32 * J] uint8 in the format's layout.

    Duck-types the few tensor attributes the runtime reads (shape, device, byte counts, row lookup
    for a quantised embedding), so a quantised matrix can stand wherever a weight tensor stands."""

    data: torch.Tensor  # [M, B*J] uint8
    fmt: str
    cols: int  # K

    def __post_init__(self):
        if self.fmt not in BLOCK_BYTES:
            raise ValueError(f"fmt: unknown block format {self.fmt!r}; known: {', '.join(FORMATS)}")
        if self.cols % BLOCK or self.data.shape[-1] != self.cols // BLOCK * BLOCK_BYTES[self.fmt]:
            raise ValueError(f"data: {tuple(self.data.shape)} bytes do not hold {self.cols} columns of {self.fmt}")
        if self.data.dtype != torch.uint8:
            raise ValueError(f"data: blocks are uint8 bytes, got {self.data.dtype}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.cols))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    def numel(self) -> int:  # bytes, with element_size() 1: numel() * element_size() is the bytes held
        return self.data.numel()

    def element_size(self) -> int:
        return 1

    def data_ptr(self) -> int:
        return self.data.data_ptr()

    def __getitem__(self, rows) -> torch.Tensor:
        """Rows dequantised to float32 (an embedding lookup): [..., K]."""
        return dequantize(self.data[rows], self.fmt)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data, self.fmt)


def is_quant(w) -> bool:
    return isinstance(w, QuantWeight)


def _split(data: torch.Tensor, fmt: str):
    """[..., B*J] bytes -> (d [..., B], m [..., B] or None, codes int8 [..., B, 32])."""
    blocks = data.reshape(*data.shape[:-1], -1, BLOCK_BYTES[fmt])  # [..., B, J]
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    if fmt == "q8_0":
        return d, None, blocks[..., 2:].contiguous().view(torch.int8)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if fmt == "q4_1" else None
    packed = blocks[..., 4:] if fmt == "q4_1" else blocks[..., 2:]  # [..., B, 16]
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1).to(torch.int8)  # element j low, j + 16 high
    return d, m, codes - 8 if fmt == "q4_0" else codes


def dequantize(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """Blocks [..., B*J] -> float32 [..., B*32], bit for bit as gguf's (and ggml's) dequantisation."""
    d, m, codes = _split(data, fmt)
    w = d.unsqueeze(-1) * codes.float()  # [..., B, 32]
    if m is not None:
        w = w + m.unsqueeze(-1)
    return w.flatten(-2)


def quantize(w: torch.Tensor, fmt: str) -> QuantWeight:
    """Float weights [M, K] -> blocks, with the gguf package's quantiser (ggml's rounding, bit-exact)."""
    import gguf

    kind = gguf.GGMLQuantizationType[GGML_NAMES[fmt]]
    data = gguf.quants.quantize(w.detach().float().contiguous().numpy(), kind)
    return QuantWeight(torch.from_numpy(data), fmt, w.shape[-1])


def linear(x: torch.Tensor, w: QuantWeight, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] float32 @ dequantize(w)^T -> [T, M]; adds into ``residual`` [T, M] in place when given.
    Rows are expanded a slice at a time, so no float32 copy of the whole weight exists at once."""
    y = torch.cat([x @ dequantize(w.data[r0:r0 + _ROW_CHUNK], w.fmt).T
                   for r0 in range(0, w.data.shape[0], _ROW_CHUNK)], dim=1)  # [T, M]
    return y if residual is None else residual.add_(y)


def exact_scores(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, unit_bias: torch.Tensor) -> torch.Tensor:
    """The router score of ``reference.router_scores`` computed on exact gate and up instead of their
    int4 shadow: log(|silu(x W_g^T) * (x W_u^T)| + 1e-20) + unit_bias, [T, F]. The router for formats
    whose shadow would cost as much as gate and up themselves (float weights [F, H])."""
    a = torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)
    return torch.log(a.abs() + 1e-20) + unit_bias
