"""Symmetric int4 "shadow" of the gate and up projections, the router's cheap predictor.

Shape legend: F = FFN units, H = hidden size, G = group size along H, R = 2F shadow rows
(rows 0..F-1 are gate units, rows F..2F-1 are up units).

Storage (the layout the fast kernels read):
    shadow_q      uint8   [R, H // 2]  two codes per byte: low nibble = even column, high = odd;
                                       stored code = q + 8 with q in [-8, 7]
    shadow_scale  float32 [R, H // G]  dequantised weight = q * scale
"""

from __future__ import annotations

import torch

# Candidate divisors of a group's absolute maximum. Plain absmax/7 wastes half a code on the
# extreme value; trying a few divisors and keeping the one with the smallest squared error per
# group is a cheap, deterministic improvement (the same idea as llama.cpp's quantiser search).
_SCALE_DIVISORS = (7.0, 7.25, 7.5, 7.75, 8.0, 8.5, 9.0, 10.0)


def check_group_size(hidden: int, group_size: int) -> None:
    if hidden % group_size != 0:
        raise ValueError(f"group_size: hidden size {hidden} is not divisible by group size {group_size}")


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w`` [R, H] to int4 codes q [R, H] (int8, in [-8, 7]) and scales [R, H // G].

    Per group, the scale with the smallest squared reconstruction error among ``_SCALE_DIVISORS``
    is kept.
    """
    rows, hidden = w.shape
    check_group_size(hidden, group_size)
    wg = w.detach().float().reshape(rows, hidden // group_size, group_size)  # [R, H/G, G]
    amax = wg.abs().amax(dim=-1).clamp_min(1e-12)  # [R, H/G]
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / 7.0
    for div in _SCALE_DIVISORS:
        scale = amax / div
        q = torch.round(wg / scale[..., None]).clamp(-8, 7)
        err = ((q * scale[..., None] - wg) ** 2).sum(dim=-1)  # [R, H/G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    q = torch.round(wg / best_scale[..., None]).clamp(-8, 7).reshape(rows, hidden)
    return q.to(torch.int8), best_scale.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [R, H] in [-8, 7] -> uint8 [R, H // 2] (low nibble = even column)."""
    if q.shape[-1] % 2:
        raise ValueError(f"hidden: need an even number of columns to pack, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # [R, H] codes 0..15
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [R, H // 2] -> int8 codes [R, H] in [-8, 7]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)  # [R, H]


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 [R, H // 2] and scales [R, H // G] -> float weight [R, H]; differentiable in ``scale``."""
    q = unpack_int4(packed).to(scale.dtype)  # [R, H]
    rows, hidden = q.shape
    groups = scale.shape[1]
    w = q.reshape(rows, groups, hidden // groups) * scale[..., None]  # [R, H/G, G]
    return w.reshape(rows, hidden)


def gptq_int4(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int = 32, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware int4 codes and scales for ``w`` [R, H] (GPTQ, Frantar et al. 2022).

    ``hessian`` [H, H] is E[x x^T] over calibration inputs. Columns are quantised one at a time and
    each rounding error is pushed onto the not-yet-quantised columns through the inverse Hessian,
    which minimises E||x (W_hat - W)^T||^2, the error of the shadow's pre-activations on real
    inputs, rather than the weight error. Same storage format as ``quantize_int4``.
    """
    rows, hidden = w.shape
    check_group_size(hidden, group_size)
    block = group_size * max(1, block // group_size)  # groups never straddle blocks
    h = hessian.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(hidden, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()  # [H, H]
    # Column-major work copy [H, R]: every per-column step below touches one contiguous row.
    work = w.detach().float().t().contiguous()
    q = torch.zeros(hidden, rows, dtype=torch.int8)
    scale = torch.zeros(hidden // group_size, rows)
    for b0 in range(0, hidden, block):
        b1 = min(b0 + block, hidden)
        err = _gptq_block(work[b0:b1], hinv[b0:b1, b0:b1], q[b0:b1], scale, b0, group_size)  # [B, R]
        work[b1:] -= hinv[b0:b1, b1:].t() @ err
    return q.t().contiguous(), scale.t().contiguous()


def _gptq_block(wb, hinv_b, q_out, scale, offset: int, group_size: int) -> torch.Tensor:
    """Quantise one block of columns (rows of ``wb`` [B, R]) in place; returns scaled errors [B, R]."""
    err = torch.zeros_like(wb)
    for i in range(wb.shape[0]):
        col = offset + i
        if col % group_size == 0:
            _, s = quantize_int4(wb[i : i + group_size].t(), group_size)  # scale from the updated group
            scale[col // group_size] = s[:, 0]
        s = scale[col // group_size]
        qi = torch.round(wb[i] / s).clamp_(-8, 7)
        q_out[i] = qi.to(torch.int8)
        e = (wb[i] - qi * s) / hinv_b[i, i]
        wb[i:] -= hinv_b[i, i:, None] * e[None, :]
        err[i] = e
    return err
