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

The kernels read the same bytes in another order (``layout="g16"``, ``pack16``): rows in groups of 16,
and per group and block the 16 rows' scales (float16), their minimums (q4_1), then the code bytes
of the 16 rows two at a time (bytes 2p and 2p + 1 of each row side by side). Sixteen rows are then
one vector lane each: 32 code bytes widen to one int16 pair per row, one multiply-add of word pairs
serves 16 rows, and a block's scale is applied once to its integer sums, with no per-row scale
conversion or reduction, which is what made the row layout compute-bound (docs/perf.md, item 20).
It is a permutation of the file's bytes,
never a re-quantisation; ``unpack16`` gives the rows back bit for bit.

The product is ``x @ dequantize(w)^T``. For the row layout activations stay float32, so it equals
the dequantised float32 twin up to summation order. For the g16 layout the kernels multiply integer
codes: activations are rounded to int16 per block of 32 first (``round_activations``: 15 bits of
the block's largest magnitude), so the product is ``round_activations(x) @ dequantize(w)^T``.
llama.cpp rounds activations to int8 per block; on the embedded model that moved perplexity by
0.16 %, more than this runtime's 0.1 % budget for running a file's own blocks. int16 steps are 256
times finer: perplexity equal to the float32 model's to four digits (docs/quantised.md).
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

    data: torch.Tensor  # rows: [M, B*J] uint8; g16: [ceil(M/16), 16*B*J]
    fmt: str
    cols: int  # K
    layout: str = "rows"  # "rows" (GGUF's) or "g16" (pack16)
    nrows: int | None = None  # M for g16 (the last group may be padded with zero blocks)

    def __post_init__(self):
        if self.fmt not in BLOCK_BYTES:
            raise ValueError(f"fmt: unknown block format {self.fmt!r}; known: {', '.join(FORMATS)}")
        lanes = GROUP if self.layout == "g16" else 1
        if self.cols % BLOCK or self.data.shape[-1] != lanes * self.cols // BLOCK * BLOCK_BYTES[self.fmt]:
            raise ValueError(f"data: {tuple(self.data.shape)} bytes do not hold {self.cols} columns of {self.fmt}")
        if self.data.dtype != torch.uint8:
            raise ValueError(f"data: blocks are uint8 bytes, got {self.data.dtype}")
        if self.layout not in ("rows", "g16"):
            raise ValueError(f"layout: {self.layout!r} is not 'rows' or 'g16'")
        if self.layout == "g16" and not (self.nrows and -(-self.nrows // GROUP) == self.data.shape[0]):
            raise ValueError(f"nrows: {self.nrows} rows do not fill {self.data.shape[0]} groups of {GROUP}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.nrows if self.layout == "g16" else self.data.shape[0], self.cols))

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
        if self.layout == "rows":
            return dequantize(self.data[rows], self.fmt)
        rows = torch.as_tensor(rows, dtype=torch.long)
        index = _g16_index(self.fmt, self.cols // BLOCK)  # [16, B*J]
        return dequantize(self.data[rows // GROUP].gather(-1, index[rows % GROUP]), self.fmt)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.row_blocks(), self.fmt)

    def row_blocks(self) -> torch.Tensor:
        """The blocks in GGUF's row layout, [M, B*J] (the data itself for layout "rows")."""
        return self.data if self.layout == "rows" else unpack16(self).data


def is_quant(w) -> bool:
    return isinstance(w, QuantWeight)


GROUP = 16  # rows per group in the g16 layout (one 512-bit vector of float32 lanes)
_INDEX: dict[tuple[str, int], torch.Tensor] = {}


def _g16_index(fmt: str, blocks: int) -> torch.Tensor:
    """Where each byte of a row lives in its group's g16 bytes: [16, B*J] positions, for row lane l
    and byte k of its row (GGUF's order). Per block the group holds 16*J bytes: the 16 scales, the 16
    minimums (q4_1), then code byte j of every lane side by side (lane l at 16 j + l)."""
    key = (fmt, blocks)
    if key not in _INDEX:
        j_bytes = BLOCK_BYTES[fmt]
        head = 4 if fmt == "q4_1" else 2  # scale (and minimum) bytes at the start of a block
        lane = torch.arange(GROUP).view(GROUP, 1)
        k = torch.arange(j_bytes).view(1, -1)
        j = k - head  # code byte
        codes = (j // 2 * GROUP + lane) * 2 + j % 2  # code bytes 2p, 2p + 1 of the 16 lanes side by side
        within = torch.where(k < head, (k // 2) * 2 * GROUP + 2 * lane + k % 2,  # float16 d (then m) of lane l
                             head * GROUP + codes)  # [16, J]
        base = torch.arange(blocks).view(1, -1, 1) * GROUP * j_bytes
        _INDEX[key] = (base + within.unsqueeze(1)).reshape(GROUP, -1)  # [16, B*J]
    return _INDEX[key]


def pack16(w: QuantWeight) -> QuantWeight:
    """The same blocks in the g16 layout (rows padded to a multiple of 16 with zero blocks)."""
    if w.layout == "g16":
        return w
    m, row_bytes = w.data.shape
    groups = -(-m // GROUP)
    rows = w.data
    if m % GROUP:  # padded with zero blocks (a copy only then: loading holds one tensor twice at most)
        rows = torch.zeros(groups * GROUP, row_bytes, dtype=torch.uint8)
        rows[:m] = w.data
    index = _g16_index(w.fmt, w.cols // BLOCK).reshape(-1)  # [16*B*J]
    packed = torch.empty(groups, GROUP * row_bytes, dtype=torch.uint8)
    packed[:, index] = rows.reshape(groups, -1)
    return QuantWeight(packed, w.fmt, w.cols, "g16", m)


def unpack16(w: QuantWeight) -> QuantWeight:
    """GGUF's row layout back from g16, bit for bit."""
    if w.layout == "rows":
        return w
    index = _g16_index(w.fmt, w.cols // BLOCK).reshape(-1)
    rows = w.data[:, index].reshape(-1, w.data.shape[1] // GROUP)
    return QuantWeight(rows[:w.nrows].contiguous(), w.fmt, w.cols)


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


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] rounded as the g16 kernels round it: per block of 32, s = max|x| / 32767 and
    codes round(x * (32767 / max|x|)) (half to even, float32 arithmetic), returned as s * codes."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)  # [T, B, 32]
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 32767.0)).reshape(x.shape)


def linear(x: torch.Tensor, w: QuantWeight, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] float32 @ dequantize(w)^T -> [T, M] (x rounded as ``round_activations`` for the g16
    layout); adds into ``residual`` [T, M] in place when given. Rows are expanded a slice at a time,
    so no float32 copy of the whole weight exists at once."""
    if w.layout == "g16":
        x = round_activations(x)
    data = w.row_blocks()
    y = torch.cat([x @ dequantize(data[r0:r0 + _ROW_CHUNK], w.fmt).T
                   for r0 in range(0, data.shape[0], _ROW_CHUNK)], dim=1)  # [T, M]
    return y if residual is None else residual.add_(y)


def exact_scores(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, unit_bias: torch.Tensor) -> torch.Tensor:
    """The router score of ``reference.router_scores`` computed on exact gate and up instead of their
    int4 shadow: log(|silu(x W_g^T) * (x W_u^T)| + 1e-20) + unit_bias, [T, F]. The router for formats
    whose shadow would cost as much as gate and up themselves (float weights [F, H])."""
    a = torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)
    return torch.log(a.abs() + 1e-20) + unit_bias
