"""Attention step of one layer: optional Qwen-style extras, then the kernel's fused attention.

Shape letters:
    N  tokens in flight    Q  query heads    K  key/value heads    D  head dim

The kernel applies RoPE, writes the new keys/values to the cache and attends (see
``adaroute.kernels.reference.attention``). Biases on q/k/v (Qwen2) and per-head q/k norms (Qwen3)
are applied to the fused projection output first, so the kernel stays Llama-shaped.
"""

from __future__ import annotations

import torch

from adaroute.runtime.kv_cache import KVCache
from adaroute.runtime.weights import LayerWeights, ModelWeights


def _head_norm(x: torch.Tensor, weight: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """RMSNorm over each head's vector: x [N, heads*D]."""
    xh = x.reshape(x.shape[0], heads, -1)  # [N, heads, D]
    xh = xh * torch.rsqrt(xh.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xh).reshape(x.shape[0], -1)


def prepare_qkv(qkv: torch.Tensor, layer: LayerWeights, w: ModelWeights) -> torch.Tensor:
    """qkv [N, (Q+2K)*D] with the layer's bias and per-head norms applied (identity for Llama)."""
    if layer.qkv_bias is None and layer.q_norm is None:
        return qkv
    if layer.qkv_bias is not None:
        qkv = qkv + layer.qkv_bias
    if layer.q_norm is not None:
        qd, kd = w.n_heads * w.head_dim, w.n_kv_heads * w.head_dim
        q, k, v = qkv.split([qd, kd, kd], dim=-1)
        q = _head_norm(q, layer.q_norm, w.n_heads, w.eps)
        k = _head_norm(k, layer.k_norm, w.n_kv_heads, w.eps)
        qkv = torch.cat([q, k, v], dim=-1)
    return qkv.contiguous()


def attend(kernel, qkv: torch.Tensor, layer: LayerWeights, w: ModelWeights, cache: KVCache,
           index: int) -> torch.Tensor:
    """qkv [N, (Q+2K)*D] -> attention output [N, Q*D]; this step's keys/values land in the cache."""
    cache.check_room(qkv.shape[0] // cache.batch)
    return kernel.attention(prepare_qkv(qkv, layer, w), cache.k[index], cache.v[index], w.rope_cos, w.rope_sin,
                            cache.pos, cache.pad_or_none(), w.n_heads)
