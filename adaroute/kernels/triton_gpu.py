"""GPU kernels: PyTorch CUDA ops for the dense products, Triton for the routed FFN.

Shape letters:
    T  tokens in flight    H  hidden size    F  FFN units    P  selected units, compacted (P <= F)
    G  int4 scale groups per row

Routed FFN in three launches and no host synchronisation (so a decode step can be captured in a
CUDA graph): (1) score every unit from the int4 shadow, (2) select in PyTorch and compact the union
of selected units to the front of an index list whose length stays on the device, (3) a
gather-GEMV over the selected gate/up rows, then one over the selected rows of w_down_t that adds
into the output. Only selected rows are read; PyTorch's index_select + matmul would first write a
copy of them, more traffic than the dense product it replaces.
"""

from __future__ import annotations

import os

import torch

from adaroute.kernels import reference

NAME = "triton"

try:
    import triton
    import triton.language as tl
except ImportError:  # the dense ops still run through PyTorch
    triton = None
    tl = None

BLOCK_UNITS = 32  # units per program (rows of a gathered tile)
BLOCK_H = 128  # hidden columns per tile
BLOCK_BYTES = 64  # packed int4 bytes (128 columns) per shadow tile
DOWN_SPLIT = 8  # programs sharing one output block in the down projection


def is_available() -> bool:
    return torch.cuda.is_available()


def has_triton() -> bool:
    return triton is not None


def _interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors in tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Dense products: cuBLAS GEMV/GEMM already reads each weight once.
linear = reference.linear
linear_multi = reference.linear_multi
head_rows = reference.head_rows
gate_up_silu = reference.gate_up_silu
rmsnorm = reference.rmsnorm
dense_ffn = reference.dense_ffn
unit_ffn = reference.unit_ffn
attention = reference.attention


def select_units(scores: torch.Tensor, threshold: float, min_units: int, max_units: int) -> torch.Tensor:
    """The reference selection policy, vectorised over tokens (no per-token loop, no host sync)."""
    f = scores.shape[-1]
    mask = scores >= threshold  # [T, F]
    if min_units > 0:
        count = mask.sum(-1, keepdim=True)  # [T, 1]
        kth = scores.topk(min(min_units, f), dim=-1).values[:, -1:]  # [T, 1]
        mask = torch.where(count < min_units, scores >= kth, mask)
    if max_units < f:
        count = mask.sum(-1, keepdim=True)
        if max_units <= 0:
            return torch.where(count > max_units, torch.zeros_like(mask), mask)
        kth = scores.topk(max_units, dim=-1).values[:, -1:]
        mask = torch.where(count > max_units, mask & (scores >= kth), mask)
    return mask


def routed_ffn(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold: float,
               min_units: int, max_units: int, residual=None,
               adapter: reference.Adapter | None = None,
               usage: torch.Tensor | None = None, scoring_copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Score -> select -> gather-compute. Returns (y [T, H], counts [T] int64); ``usage`` [F] as in
    ``reference.add_usage`` (``scoring_copy``: the CPU kernels' layout choice, not used here). With a routing
    adapter the selection is the same and the masked FFN with its low-rank terms runs in PyTorch
    (on the GPU when x is there): correct, not yet fused into the gather kernel."""
    if triton is None or not (x.is_cuda or _interpreting()) or adapter is not None:
        scores = router_scores(x, shadow_q, shadow_scale, unit_bias) if x.is_cuda and triton is not None else \
            reference.router_scores(x, shadow_q, shadow_scale, unit_bias)
        mask = select_units(scores, threshold, min_units, max_units)
        reference.add_usage(usage, mask)
        return reference.unit_ffn(x, w_gate, w_up, w_down_t, mask, residual, adapter), mask.sum(-1)
    x = x.contiguous()
    # Rows may be H apart or 3H (views of a [F, 3, H] store); columns must be contiguous.
    w_gate, w_up, w_down_t = (w if w.stride(1) == 1 else w.contiguous() for w in (w_gate, w_up, w_down_t))
    scores = router_scores(x, shadow_q, shadow_scale, unit_bias)  # [T, F]
    mask = select_units(scores, threshold, min_units, max_units)  # [T, F]
    reference.add_usage(usage, mask)
    y = residual if residual is not None else torch.zeros_like(x)  # [T, H]
    _masked_unit_ffn(x, w_gate, w_up, w_down_t, mask, y)
    return y, mask.sum(-1)


def router_scores(x, shadow_q, shadow_scale, unit_bias) -> torch.Tensor:
    """Scores [T, F] straight from the packed int4 shadow, with x quantised to int8 per scale group
    as ``reference.router_scores`` defines it."""
    t, h = x.shape
    f = unit_bias.shape[0]
    groups = shadow_scale.shape[1]
    xq, sx = reference.quantize_activations(x, h // groups)  # [T, H] int8, [T, G]
    out = torch.empty(t, f, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(f, BLOCK_UNITS), t)
    _score_kernel[grid](xq, sx.contiguous(), shadow_q, shadow_scale, unit_bias, out, f, h, h // 2, groups,
                        h // groups, BLOCK_U=BLOCK_UNITS, BLOCK_J=BLOCK_BYTES)
    return out


def _masked_unit_ffn(x, w_gate, w_up, w_down_t, mask, y) -> None:
    """y [T, H] += sum over selected units of silu(g) * u * w_down_t[unit], per token."""
    t, h = x.shape
    f = w_gate.shape[0]
    selected = mask.any(0)  # [F] union over tokens
    # Selected units first, in ascending order; their count stays on the device.
    order = torch.argsort((~selected).to(torch.uint8), stable=True).to(torch.int32)  # [F]
    n = selected.sum().to(torch.int32).reshape(1)
    mask_u8 = mask.to(torch.uint8).contiguous()  # [T, F]
    act = torch.empty(t, f, dtype=torch.float32, device=x.device)  # [T, P] (first n columns used)
    _gate_up_kernel[(triton.cdiv(f, BLOCK_UNITS), t)](x, w_gate, w_up, order, n, mask_u8, act, f, h,
                                                      w_gate.stride(0), w_up.stride(0),
                                                      BLOCK_P=BLOCK_UNITS, BLOCK_H=BLOCK_H)
    chunk = triton.cdiv(triton.cdiv(f, DOWN_SPLIT), BLOCK_UNITS) * BLOCK_UNITS
    grid = (triton.cdiv(h, BLOCK_H), triton.cdiv(f, chunk), t)
    _down_kernel[grid](act, w_down_t, order, n, y, f, h, w_down_t.stride(0), chunk, BLOCK_P=BLOCK_UNITS,
                       BLOCK_H=BLOCK_H)


if triton is not None:

    @triton.jit
    def _score_kernel(xq_ptr, sx_ptr, q_ptr, s_ptr, bias_ptr, out_ptr, F, H, HALF, SCOLS, GROUP,
                      BLOCK_U: tl.constexpr, BLOCK_J: tl.constexpr):
        """One program: BLOCK_U units x one token. Byte j of a row holds columns 2j (low nibble)
        and 2j+1 (high nibble), stored as q + 8; x comes as int8 codes xq with per-group scales sx.
        The integer products (and their pairwise sums) are exact in float32."""
        t = tl.program_id(1)
        units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)  # [U]
        um = units < F
        acc_g = tl.zeros([BLOCK_U], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_U], dtype=tl.float32)
        for j0 in range(0, HALF, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)  # [J] byte index
            jm = js < HALF
            xe = tl.load(xq_ptr + t * H + 2 * js, mask=jm, other=0).to(tl.float32)  # [J] even columns
            xo = tl.load(xq_ptr + t * H + 2 * js + 1, mask=jm, other=0).to(tl.float32)  # [J] odd columns
            m2 = um[:, None] & jm[None, :]
            grp = (2 * js) // GROUP  # [J] (both columns of a byte share a group)
            sx = tl.load(sx_ptr + t * SCOLS + grp, mask=jm, other=0.0)  # [J]
            for half_rows in tl.static_range(2):  # 0: gate rows, 1: up rows (offset F)
                rows = units + half_rows * F
                b = tl.load(q_ptr + rows[:, None].to(tl.int64) * HALF + js[None, :], mask=m2, other=8)
                b = b.to(tl.int32)
                s = tl.load(s_ptr + rows[:, None].to(tl.int64) * SCOLS + grp[None, :], mask=m2, other=0.0)
                lo = ((b & 15) - 8).to(tl.float32)
                hi = ((b >> 4) - 8).to(tl.float32)
                part = tl.sum((lo * xe[None, :] + hi * xo[None, :]) * (s * sx[None, :]), axis=1)  # [U]
                if half_rows == 0:
                    acc_g += part
                else:
                    acc_u += part
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        score = tl.log(tl.abs(act) + 1e-20) + tl.load(bias_ptr + units, mask=um, other=0.0)
        tl.store(out_ptr + t * F + units, score, mask=um)

    @triton.jit
    def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, idx_ptr, n_ptr, mask_ptr, act_ptr, F, H, LDG, LDU,
                        BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
        """act[t, p] = silu(w_gate[u] . x[t]) * (w_up[u] . x[t]) for u = idx[p], p < n; 0 where
        token t did not select u. LDG, LDU: row strides (H, or 3H for views of a [F, 3, H] store)."""
        t = tl.program_id(1)
        n = tl.load(n_ptr)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # [P]
        pm = ps < n
        units = tl.load(idx_ptr + ps, mask=pm, other=0).to(tl.int64)
        acc_g = tl.zeros([BLOCK_P], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_P], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            hm = hs < H
            xv = tl.load(x_ptr + t * H + hs, mask=hm, other=0.0)  # [BH]
            m2 = pm[:, None] & hm[None, :]
            wg = tl.load(wg_ptr + units[:, None] * LDG + hs[None, :], mask=m2, other=0.0)  # [P, BH]
            wu = tl.load(wu_ptr + units[:, None] * LDU + hs[None, :], mask=m2, other=0.0)
            acc_g += tl.sum(wg * xv[None, :], axis=1)
            acc_u += tl.sum(wu * xv[None, :], axis=1)
        chosen = tl.load(mask_ptr + t * F + units, mask=pm, other=0)
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        act = tl.where(chosen != 0, act, 0.0)
        tl.store(act_ptr + t * F + ps, act, mask=pm)

    @triton.jit
    def _down_kernel(act_ptr, wd_ptr, idx_ptr, n_ptr, y_ptr, F, H, LDD, CHUNK,
                     BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
        """y[t, hblock] += sum over p in this program's chunk (p < n) of act[t, p] * w_down_t[idx[p], hblock]."""
        t = tl.program_id(2)
        n = tl.load(n_ptr)
        hs = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = hs < H
        start = tl.program_id(1) * CHUNK
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for p0 in range(0, CHUNK, BLOCK_P):
            ps = start + p0 + tl.arange(0, BLOCK_P)  # [P]
            pm = (ps < n) & (ps < start + CHUNK)
            units = tl.load(idx_ptr + ps, mask=pm, other=0).to(tl.int64)
            a = tl.load(act_ptr + t * F + ps, mask=pm, other=0.0)  # [P]
            w = tl.load(wd_ptr + units[:, None] * LDD + hs[None, :], mask=pm[:, None] & hm[None, :], other=0.0)
            acc += tl.sum(w * a[:, None], axis=0)
        tl.atomic_add(y_ptr + t * H + hs, acc, mask=hm)
