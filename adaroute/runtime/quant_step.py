"""The one-call decode step for models with block-quantised projections (``ar_qdecode_layers`` in
``adaroute/kernels/csrc/quant.cpp``): the same layer sequence as ``FusedDecoder``, every product
a block-quantised one; routed FFNs run ``ar_qrouted_ffn`` with the same sparse limits, unit counts,
usage counter and per-token fail-safe as the float decoder.

``fused_decoder(weights)`` picks the decoder that fits a model's weights (or None: the engine then
runs its Python path, which dispatches quantised weights to the same kernels one call at a time).
"""

from __future__ import annotations

import ctypes

import torch

from adaroute.kernels import cpu
from adaroute.kernels.quant_cpu import fmt_code, unit_stride
from adaroute.kernels.quant_reference import BLOCK, is_quant
from adaroute.runtime.fused_cpu import ArStep, FusedDecoder, _plain
from adaroute.runtime.weights import DenseFFN, ModelWeights, RoutedFFN

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class ArQLayer(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("attn_norm", "mlp_norm", *_MATRICES)] + \
               [(n, _I64) for n in ("fq", "fk", "fv", "fo", "fg", "fu", "fd", "q_rows", "kv_rows", "units")] + \
               [(n, _P) for n in ("shadow_q", "shadow_scale", "unit_bias")] + \
               [(n, _I64) for n in ("ldw", "group_size", "kind", "min_units", "max_units", "sparse_max_tokens")] + \
               [("threshold", ctypes.c_float)] + [(n, _I64) for n in ("band_lo", "band_hi", "fault")] + \
               [(n, _P) for n in ("a_in", "a_units", "a_out")] + [("adapter_rank", _I64)]


def _half(*ts) -> bool:
    return all(t.dtype == torch.float16 and t.is_contiguous() and not t.is_cuda for t in ts)


def is_quantised(w: ModelWeights) -> bool:
    return any(is_quant(m) for ly in w.layers for m in (ly.wq, ly.ffn.w_gate))


def fused_decoder(w: ModelWeights, scoring_copy: bool = True) -> FusedDecoder | None:
    """``scoring_copy``: the float32 decoder scores from g16 copies of the shadows (``FusedDecoder``)."""
    return QuantDecoder.build(w) if is_quantised(w) else FusedDecoder.build(w, scoring_copy)


def _matrices(ly) -> list:
    f = ly.ffn
    return [ly.wq, ly.wk, ly.wv, ly.wo, f.w_gate, f.w_up, f.w_down if isinstance(f, DenseFFN) else f.w_down_t]


class QuantDecoder(FusedDecoder):
    """``FusedDecoder``'s call (scratch, cache, step structure, routed policies and fail-safe bands)
    over quantised layers: only the layer table and the library function differ, so those are all
    this class sets up."""

    def __init__(self, w: ModelWeights, lib):  # not super().__init__: that binds float layers
        self.w, self._fn = w, lib.ar_qdecode_layers
        self._fn.argtypes, self._fn.restype = [ctypes.POINTER(ArQLayer), ctypes.POINTER(ArStep)], None
        self.layers = (ArQLayer * len(w.layers))()
        self._routed, self._limits, self._bands, self._scratch, self._ffn_out = [], None, None, {}, {}
        self.units = w.layers[0].ffn.w_gate.shape[0]
        for i, (ly, c) in enumerate(zip(w.layers, self.layers, strict=True)):
            mats = _matrices(ly)
            c.attn_norm, c.mlp_norm = ly.attn_norm.data_ptr(), ly.mlp_norm.data_ptr()
            for name, m in zip(_MATRICES, mats, strict=True):
                setattr(c, name, m.data_ptr())
            c.fq, c.fk, c.fv, c.fo, c.fg, c.fu, c.fd = (fmt_code(m) for m in mats)
            c.q_rows, c.kv_rows, c.units = ly.wq.shape[0], ly.wk.shape[0], ly.ffn.w_gate.shape[0]
            f = ly.ffn
            if isinstance(f, RoutedFFN):
                c.kind, c.ldw = 1, unit_stride(f.w_gate, f.w_up, f.w_down_t)
                c.shadow_q = f.shadow_q.data_ptr() if f.shadow_q.numel() else None
                c.shadow_scale = f.shadow_scale.data_ptr() if f.shadow_scale.numel() else None
                c.unit_bias = f.unit_bias.data_ptr()
                if f.adapter is not None:
                    c.a_in, c.a_units, c.a_out = (t.data_ptr() for t in f.adapter)
                    c.adapter_rank = f.adapter.rank
                c.group_size = ly.wq.shape[1] // f.shadow_scale.shape[1] if f.shadow_scale.numel() else BLOCK
                self._routed.append((i, f))

    @classmethod
    def build(cls, w: ModelWeights) -> QuantDecoder | None:
        lib = cpu._lib()
        if lib is None or not hasattr(lib, "ar_qdecode_layers") or w.embed.is_cuda or not w.layers:
            return None
        first = w.layers[0]
        for ly in w.layers:
            if not all(map(is_quant, _matrices(ly))) or ly.ffn.w_gate.layout != ly.ffn.w_up.layout:
                return None  # mixed layers: the engine's Python path
            f = ly.ffn
            if isinstance(f, RoutedFFN) and (f.adapter is not None and (f.shadow_q.numel() or not _half(*f.adapter))
                                             or unit_stride(f.w_gate, f.w_up, f.w_down_t) is None
                                             or not _plain(f.unit_bias, f.shadow_scale) or
                                             not f.shadow_q.is_contiguous()):
                return None
            if (ly.ffn.w_gate.shape, ly.wq.shape, ly.wk.shape) != (first.ffn.w_gate.shape, first.wq.shape,
                                                                    first.wk.shape):
                return None
            if ly.qkv_bias is not None or ly.q_norm is not None or not _plain(ly.attn_norm, ly.mlp_norm):
                return None
        return cls(w, lib) if _plain(w.rope_cos, w.rope_sin) else None
