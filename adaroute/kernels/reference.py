"""Reference kernels in plain PyTorch: the ground truth every fast kernel is tested against.

Shape letters:
    T  tokens in flight        H  hidden size        M  output rows of a dense weight
    F  FFN units               G  int4 groups per row (H / GROUP)
    B  sequences               Q  query heads        K  key/value heads
    S  cache slots             D  head dim           N = B*T

Routed FFN contract (shared with ``adaroute.routing``): a unit i is computed for token t iff
``score[t, i] >= threshold``; if fewer than ``min_units`` pass, the top ``min_units`` by score are
taken; then, if more than ``max_units`` remain, the top ``max_units``. The score comes from an int4
"shadow" of the gate/up weights: ``log(|silu(g_hat) * u_hat| + 1e-20) + unit_bias``.

Router score definition (one place, here; every kernel implements exactly this):
    * x is quantised per token and per scale group of the shadow (G_s = H / shadow_scale.shape[1]
      columns) to symmetric int8: ``sx = max|x_g| / 127`` (float32), ``xq = round(x / sx)`` rounded
      half to even (``torch.round``), clamped to [-127, 127]; a group of zeros has sx = 0, xq = 0.
    * per group, an exact integer dot product of the int4 codes q in [-8, 7] with xq:
      ``dot[t, r, g] = sum_{j in g} q[r, j] * xq[t, j]``;
    * ``gu[t, r] = sum_g (shadow_scale[r, g] * sx[t, g]) * dot[t, r, g]``, g_hat = gu[:, :F],
      u_hat = gu[:, F:].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

NAME = "reference"
GROUP = 32  # default int4 shadow group size along H (any size dividing H is read correctly)
SCORE_EPS = 1e-20


def is_available() -> bool:
    return True


def linear(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w [M, K]^T -> [T, M]; with ``residual`` [T, M] the result is added to it in place.
    A block-quantised w (``quant_reference.QuantWeight``) takes the blocks' product."""
    if not isinstance(w, torch.Tensor):
        from adaroute.kernels import quant_reference

        return quant_reference.linear(x, w, residual)
    y = F.linear(x, w)
    return y if residual is None else residual.add_(y)


def top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per token of ``scores`` [T, V], the indices of its k largest values (ties: the lower index
    first), best first: [T, min(k, V)]."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def head_rows(x: torch.Tensor, head: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """The routed output head's exact rows: ``logits`` [T, V] holds cheap (shadow) logits; the k rows
    per token that score highest there (``top_rows``) are set, in place, to their exact logits
    x[t] . head[row] (x [T, H], head [V, H] float32). Returns the rows, [T, k]."""
    idx = top_rows(logits, k)
    for t in range(x.shape[0]):
        logits[t, idx[t]] = head[idx[t]] @ x[t]
    return idx


def linear_multi(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """Several weights sharing one input, outputs side by side: [T, sum(M_s)]."""
    return torch.cat([F.linear(x, w) for w in ws], dim=-1)


def gate_up_silu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU input: silu(x W_g^T) * (x W_u^T), [T, F]."""
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm over the last dimension, computed in float32 as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def dense_ffn(x, w_gate, w_up, w_down, residual=None) -> torch.Tensor:
    """Dense SwiGLU FFN with w_down [H, F] as stored in transformers."""
    return linear(gate_up_silu(x, w_gate, w_up), w_down, residual)


def dequantize_shadow(shadow_q: torch.Tensor, shadow_scale: torch.Tensor) -> torch.Tensor:
    """Packed int4 [R, H/2] uint8 (low nibble = even column, stored q + 8) and scales [R, G] -> [R, H]."""
    rows, groups = shadow_q.shape[0], shadow_scale.shape[1]
    lo = (shadow_q & 0xF).to(torch.int16) - 8  # [R, H/2] even columns
    hi = (shadow_q >> 4).to(torch.int16) - 8  # [R, H/2] odd columns
    q = torch.stack([lo, hi], dim=-1).reshape(rows, -1).float()  # [R, H]
    w = q.view(rows, groups, -1) * shadow_scale.unsqueeze(-1)  # [R, G, H/G]
    return w.reshape(rows, -1)


def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token and group: x [..., H] -> (xq int8 [..., H], scale float32 [..., H/G]).

    scale = max|x_g| / 127 and xq = round(x / scale) (half to even), so x ~= xq * scale; an all-zero
    group has scale 0 and codes 0. Not differentiable (the codes are integers).
    """
    lead, h = x.shape[:-1], x.shape[-1]  # any leading dimensions
    xg = x.detach().float().reshape(*lead, h // group_size, group_size)  # [T, G, GS]
    scale = xg.abs().amax(dim=-1) / 127  # [T, G]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.round(xg / safe.unsqueeze(-1)).clamp_(-127, 127)
    return xq.to(torch.int8).reshape(*lead, h), scale


def unpack_shadow_codes(shadow_q: torch.Tensor) -> torch.Tensor:
    """Packed int4 [R, H/2] uint8 (low nibble = even column, stored q + 8) -> codes q in [-8, 7], int8 [R, H]."""
    lo = (shadow_q & 0xF).to(torch.int8) - 8  # [R, H/2] even columns
    hi = (shadow_q >> 4).to(torch.int8) - 8  # [R, H/2] odd columns
    return torch.stack([lo, hi], dim=-1).reshape(shadow_q.shape[0], -1)


def _group_dots(xq: torch.Tensor, q: torch.Tensor, groups: int):
    """Exact integer dot products, one group at a time: yields dot [T, R] (float32) for g = 0 .. G-1
    from xq [T, H] and codes q [R, H].

    Every partial sum is an integer below 2^24 in magnitude (|q * xq| <= 1016 and a group is far
    shorter than 16512 columns), so a float32 matmul computes them exactly in any summation order.
    """
    t, h = xq.shape
    xg = xq.float().reshape(t, groups, h // groups)  # [T, G, GS]
    qg = q.float().reshape(q.shape[0], groups, h // groups)  # [R, G, GS]
    for g in range(groups):
        yield xg[:, g] @ qg[:, g].t()  # [T, R]


class _ShadowProduct(torch.autograd.Function):
    """gu[t, r] = sum_g (shadow_scale[r, g] * sx[t, g]) * dot[t, r, g], differentiable in shadow_scale.

    Backward regroups the sum rather than recomputing the dots ([G, T, R] would be large for the
    thousands of tokens of a training batch): d gu[t, r] / d shadow_scale[r, g] = sx[t, g] dot[t, r, g],
    so grad_scale[r, g] = sum_{j in g} q[r, j] * (grad^T @ x_deq)[r, j] with x_deq = sx * xq, one
    matrix product instead of a [T, R] pass per group."""

    @staticmethod
    def forward(ctx, xq, sx, q, shadow_scale):
        groups = shadow_scale.shape[1]
        s = shadow_scale.detach().float()  # [R, G]
        gu = torch.zeros(xq.shape[0], q.shape[0], dtype=torch.float32, device=xq.device)  # [T, R]
        for g, dot in enumerate(_group_dots(xq, q, groups)):
            gu += (s[:, g].unsqueeze(0) * sx[:, g].unsqueeze(1)) * dot
        ctx.save_for_backward(xq, sx, q)
        ctx.groups = groups
        return gu

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[3]:
            return None, None, None, None
        xq, sx, q = ctx.saved_tensors
        t, h = xq.shape
        x_deq = (xq.float().view(t, ctx.groups, -1) * sx.unsqueeze(-1)).view(t, h)  # [T, H]
        m = grad.t() @ x_deq  # [R, H]
        grad_scale = (m * q.float()).view(q.shape[0], ctx.groups, -1).sum(-1)  # [R, G]
        return None, None, None, grad_scale


def router_scores(x, shadow_q, shadow_scale, unit_bias) -> torch.Tensor:
    """Per-unit score [..., F] for x [..., H] from the int4 shadow of [gate; up] and int8 activations
    (see the module docstring for the exact definition). Differentiable in ``shadow_scale`` and
    ``unit_bias``; x is not differentiated (its quantisation has no useful gradient)."""
    f, h = unit_bias.shape[0], x.shape[-1]
    groups = shadow_scale.shape[1]
    xq, sx = quantize_activations(x.reshape(-1, h), h // groups)  # [T, H], [T, G]
    gu = _ShadowProduct.apply(xq, sx, unpack_shadow_codes(shadow_q), shadow_scale)  # [T, 2F]
    g_hat, u_hat = gu[:, :f], gu[:, f:]
    score = torch.log((F.silu(g_hat) * u_hat).abs() + SCORE_EPS) + unit_bias
    return score.reshape(*x.shape[:-1], f)


def router_scores_dequantized(x, shadow_q, shadow_scale, unit_bias) -> torch.Tensor:
    """``router_scores`` by one product with the dequantised shadow instead of per-group integer dots:
    the same sum in another order, so equal up to float rounding. For training batches, where the
    per-group passes over [T, 2F] dominate a step; thresholds are always calibrated with the exact
    definition. Differentiable in ``shadow_scale`` and ``unit_bias``."""
    f, h = unit_bias.shape[0], x.shape[-1]
    groups = shadow_scale.shape[1]
    xq, sx = quantize_activations(x.reshape(-1, h), h // groups)  # [T, H], [T, G]
    x_deq = (xq.float().view(-1, groups, h // groups) * sx.unsqueeze(-1)).view(-1, h)  # [T, H]
    codes = unpack_shadow_codes(shadow_q).float().view(2 * f, groups, -1)  # [2F, G, H/G]
    gu = x_deq @ (codes * shadow_scale.unsqueeze(-1)).view(2 * f, h).t()  # [T, 2F]
    score = torch.log((F.silu(gu[:, :f]) * gu[:, f:]).abs() + SCORE_EPS) + unit_bias
    return score.reshape(*x.shape[:-1], f)


def select_units(scores: torch.Tensor, threshold: float, min_units: int, max_units: int) -> torch.Tensor:
    """The selection policy, defined once: scores [T, F] -> bool mask [T, F] of the units to compute.

    Unit i runs iff score_i >= threshold; a token with fewer than ``min_units`` such units takes its
    top ``min_units``; then one with more than ``max_units`` keeps its top ``max_units``.
    """
    mask = scores >= threshold  # [T, F]
    units = scores.shape[-1]
    if min_units > 0:
        count = mask.sum(dim=-1, keepdim=True)  # [T, 1]
        if bool((count < min_units).any()):
            kth = scores.topk(min(min_units, units), dim=-1).values[:, -1:]  # [T, 1]
            mask |= (scores >= kth) & (count < min_units)
    if max_units < units:
        count = mask.sum(dim=-1, keepdim=True)
        if bool((count > max_units).any()):
            kth = scores.topk(max(max_units, 0), dim=-1).values[:, -1:] if max_units > 0 else None
            keep = (scores >= kth) if kth is not None else torch.zeros_like(mask)
            mask &= keep | (count <= max_units)
    return mask


def add_usage(usage: torch.Tensor | None, mask: torch.Tensor) -> None:
    """Unit-usage counting, defined once: usage [F] int64 += how many tokens of mask [T, F] (the final
    selection) selected each unit; None counts nothing. (``Engine.unit_usage`` keeps one row per layer.)"""
    if usage is not None:
        usage += mask.sum(0).to(usage.device, usage.dtype)


class Adapter(NamedTuple):
    """Low-rank corrections of a routed FFN (rank r), applied on the routed path only:

        g = x W_g^T + (x A_g^T) B_g^T,   u = x W_u^T + (x A_u^T) B_u^T,   y = a W_d^T + (a A_d^T) B_d^T

    w_in   [2r, H]    A_g then A_u: the input projections, read once per token;
    w_units [F, 3, r] per unit i: row i of B_g, row i of B_u and column i of A_d side by side, so a
                      selected unit adds one contiguous 3r read and an unselected one costs nothing;
    w_out  [H, r]     B_d: the down adapter's output projection, read once per token.
    """

    w_in: torch.Tensor
    w_units: torch.Tensor
    w_out: torch.Tensor

    @property
    def rank(self) -> int:
        return self.w_out.shape[1]


def adapted_gate_up(x, w_gate, w_up, adapter: Adapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up pre-activations [T, F] of x [T, H], with the adapter's correction when given."""
    g, u = F.linear(x, w_gate), F.linear(x, w_up)  # [T, F]
    if adapter is None:
        return g, u
    adapter = Adapter(*(t.to(x.dtype) for t in adapter))  # (quantised models hold it in float16)
    r = adapter.rank
    z = F.linear(x, adapter.w_in)  # [T, 2r]
    return g + z[:, :r] @ adapter.w_units[:, 0].t(), u + z[:, r:] @ adapter.w_units[:, 1].t()


def adapted_down(a, w_down_t, adapter: Adapter | None = None) -> torch.Tensor:
    """Down projection of unit activations a [T, F] (zero for unselected units) -> [T, H]."""
    y = F.linear(a, w_down_t.t())  # [T, H]
    if adapter is None:
        return y
    adapter = Adapter(*(t.to(a.dtype) for t in adapter))
    return y + F.linear(a @ adapter.w_units[:, 2], adapter.w_out)  # [T, r] -> [T, H]


def unit_ffn(x, w_gate, w_up, w_down_t, mask: torch.Tensor | None = None, residual=None,
             adapter: Adapter | None = None) -> torch.Tensor:
    """SwiGLU FFN in the unit-contiguous layout (w_down_t [F, H]); ``mask`` [T, F] zeroes unselected units."""
    g, u = adapted_gate_up(x, w_gate, w_up, adapter)
    a = F.silu(g) * u  # [T, F]
    if mask is not None:
        a = a * mask
    y = adapted_down(a, w_down_t, adapter)  # [T, H]
    return y if residual is None else residual.add_(y)


def routed_ffn(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold: float,
               min_units: int, max_units: int, residual=None,
               adapter: Adapter | None = None, usage: torch.Tensor | None = None,
               scoring_copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed FFN: returns (y [T, H], counts [T] int64 of units computed per token). The adapter, when
    given, corrects only the selected units (the dense path, ``unit_ffn`` without one, stays the base).
    ``usage`` [F] int64, when given, gets the selection added (``add_usage``). ``scoring_copy`` is the
    compiled kernels' layout choice (``cpu.routed_ffn``); the reference has one layout."""
    mask = select_units(router_scores(x, shadow_q, shadow_scale, unit_bias), threshold, min_units, max_units)
    y = unit_ffn(x, w_gate, w_up, w_down_t, mask, residual, adapter)
    add_usage(usage, mask)
    return y, mask.sum(-1)


def pack_units(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    """One [F, 3, H] store holding each unit's gate row, up row and down column side by side."""
    return torch.stack([w_gate, w_up, w_down_t], dim=1).contiguous()


def unit_views(w_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w_gate, w_up, w_down_t as [F, H] views (row stride 3H) of a [F, 3, H] store."""
    return w_units[:, 0], w_units[:, 1], w_units[:, 2]


def is_unit_packed(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor) -> bool:
    """Whether the three [F, H] weights are the views ``unit_views`` gives of one [F, 3, H] store."""
    f, h = w_gate.shape
    base = w_gate.data_ptr()
    step = h * w_gate.element_size()
    return (all(w.shape == (f, h) and w.dtype == w_gate.dtype and w.device == w_gate.device
                and w.stride() == (3 * h, 1) for w in (w_gate, w_up, w_down_t))
            and w_up.data_ptr() == base + step and w_down_t.data_ptr() == base + 2 * step
            and w_gate.untyped_storage().data_ptr() == w_down_t.untyped_storage().data_ptr())


def rope_table_lookup(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor):
    """cos, sin [B, T, 1, D] for positions [B, T] from tables [positions, D]."""
    return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]: the half-rotation form transformers' Llama uses."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def slot_positions(pos: int, t: int, pad: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """RoPE positions [B, T] of cache slots pos .. pos+t-1 (left padding pad [B] not counted)."""
    slots = pos + torch.arange(t, device=device).unsqueeze(0)  # [1, T]
    return slots.expand(batch, t) if pad is None else (slots - pad.unsqueeze(1)).clamp_min(0)


def attention_mask(pos: int, t: int, pad: torch.Tensor | None, device) -> torch.Tensor | None:
    """Bool mask [B, 1, T, pos+t] (True = attend), or None when plain causal attention is exact."""
    if pad is None:
        if t == 1 or pos == 0:
            return None
        pad = torch.zeros(1, dtype=torch.long, device=device)
    keys = torch.arange(pos + t, device=device)  # [S']
    queries = pos + torch.arange(t, device=device)  # [T]
    causal = keys.unsqueeze(0) <= queries.unsqueeze(1)  # [T, S']
    real = keys.unsqueeze(0) >= pad.unsqueeze(1)  # [B, S']
    # A padding query would otherwise see no key at all (NaN rows); let it see itself.
    itself = keys.unsqueeze(0) == queries.unsqueeze(1)  # [T, S']
    return ((causal.unsqueeze(0) & real.unsqueeze(1)) | itself.unsqueeze(0)).unsqueeze(1)  # [B, 1, T, S']


def attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, pos: int, pad: torch.Tensor | None, n_heads: int) -> torch.Tensor:
    """Grouped-query attention of T new tokens per sequence over the cache, in place.

    qkv [N, (Q+2K)*D] for B left-padded sequences; caches [B, K, S, D]; cos/sin tables [positions, D].
    RoPE is applied, the new keys/values are written to slots pos .. pos+T-1, and the output is
    [N, Q*D]. Token t of sequence b has position pos + t - pad[b] and attends slots pad[b] .. pos + t.
    ``pad`` None means no sequence is padded (and spares a device-to-host check on GPUs).
    """
    b, n_kv, _, d = k_cache.shape
    t = qkv.shape[0] // b
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    rope = rope_table_lookup(cos, sin, slot_positions(pos, t, pad, b, qkv.device))
    q = apply_rope(q.reshape(b, t, n_heads, d), *rope)  # [B, T, Q, D]
    k = apply_rope(k.reshape(b, t, n_kv, d), *rope)  # [B, T, K, D]
    k_cache[:, :, pos:pos + t] = k.transpose(1, 2)
    v_cache[:, :, pos:pos + t] = v.reshape(b, t, n_kv, d).transpose(1, 2)
    mask = attention_mask(pos, t, pad, qkv.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :pos + t], v_cache[:, :, :pos + t],
                                         attn_mask=mask, is_causal=mask is None and t > 1,
                                         enable_gqa=n_heads != n_kv)  # [B, Q, T, D]
    return out.transpose(1, 2).reshape(b * t, n_heads * d)
