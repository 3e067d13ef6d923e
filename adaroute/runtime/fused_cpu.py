"""All decoder layers of a decode step in one call into the CPU kernel library
(``adaroute/kernels/csrc/decode_step.cpp``).

The per-layer sequence (norm, q/k/v, attention, o, norm, FFN) is the one ``Engine._layer`` runs
through the kernel interface; here it runs in C with the weight pointers bound once, which removes
~8 foreign calls and their argument checks per layer. It applies to Llama-shaped layers (no q/k/v
bias, no per-head norms), float32 contiguous weights and at most ``cpu.MAX_GEMV_TOKENS`` tokens in
flight; ``FusedDecoder.build`` returns None for anything else and the engine keeps its Python path.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from adaroute.kernels import cpu
from adaroute.runtime.failsafe import FAULT_CODES, FailSafe
from adaroute.runtime.kv_cache import KVCache
from adaroute.runtime.weights import DenseFFN, ModelWeights, RoutedFFN

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class ArLayer(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down",
                                        "shadow_q", "shadow_scale", "unit_bias")] + \
               [(name, _I64) for name in ("q_rows", "kv_rows", "units", "ldw", "group_size", "kind", "min_units",
                                          "max_units", "sparse_max_tokens")] + [("threshold", ctypes.c_float)] + \
               [(name, _I64) for name in ("band_lo", "band_hi", "fault")] + \
               [(name, _P) for name in ("a_in", "a_units", "a_out")] + [("adapter_rank", _I64), ("shadow_g16", _P)]


class ArStep(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("x", "h", "qkv", "attn", "hid", "counts", "k_cache", "v_cache", "pad", "cos",
                                        "sin")] + \
               [(name, _I64) for name in ("n_layers", "b", "t", "hidden", "n_heads", "n_kv", "head_dim", "s_max", "pos",
                                          "nthreads", "layer_stride")] + [("eps", ctypes.c_float)] + \
               [("failsafe", _P), ("ffn_out", _P), ("usage", _P)]


def _plain(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() and not t.is_cuda for t in ts)


class FusedDecoder:
    """Runs ``Engine._layer`` for every layer in one library call; see the module docstring."""

    max_tokens = cpu.MAX_GEMV_TOKENS

    def __init__(self, w: ModelWeights, lib, scoring_copy: bool = True):
        self.w, self._fn = w, lib.ar_decode_layers
        self._fn.argtypes, self._fn.restype = [ctypes.POINTER(ArLayer), ctypes.POINTER(ArStep)], None
        self.layers = (ArLayer * len(w.layers))()
        self._routed = []  # (index, RoutedFFN) of routed layers: their policy is copied in when it changes
        self.units = w.layers[0].ffn.w_gate.shape[0]  # F (the same in every layer of these models)
        self._limits = self._bands = None
        self._scratch: dict[int, tuple] = {}
        self._ffn_out: dict[int, torch.Tensor] = {}  # [N, H] per N: the fail-safe's scratch
        self.held: list[torch.Tensor] = []  # tensors made here whose pointers the layers hold
        for i, (ly, c) in enumerate(zip(w.layers, self.layers, strict=True)):
            c.attn_norm, c.wq, c.wk, c.wv, c.wo, c.mlp_norm = (t.data_ptr() for t in (
                ly.attn_norm, ly.wq, ly.wk, ly.wv, ly.wo, ly.mlp_norm))
            c.q_rows, c.kv_rows = ly.wq.shape[0], ly.wk.shape[0]
            f = ly.ffn
            c.units = f.w_gate.shape[0]
            if isinstance(f, DenseFFN):
                c.kind, c.w_gate, c.w_up, c.w_down = 0, f.w_gate.data_ptr(), f.w_up.data_ptr(), f.w_down.data_ptr()
            else:
                c.kind, c.ldw = 1, f.w_gate.stride(0)
                c.w_gate, c.w_up, c.w_down = f.w_gate.data_ptr(), f.w_up.data_ptr(), f.w_down_t.data_ptr()
                c.shadow_q, c.shadow_scale, c.unit_bias = (t.data_ptr() for t in (f.shadow_q, f.shadow_scale,
                                                                                   f.unit_bias))
                c.group_size = cpu._group_size(ly.mlp_norm.view(1, -1), f.shadow_scale)
                if f.shadow_g16 is not None:  # the weights hold the scoring layout (and no rows)
                    c.shadow_g16 = f.shadow_g16.data_ptr()
                elif scoring_copy:  # the scoring layout, made once per shadow (else the rows are scored)
                    g16 = cpu.shadow_g16(f.shadow_q, f.shadow_scale)
                    self.held.append(g16)
                    c.shadow_g16 = g16.data_ptr()
                if f.adapter is not None:
                    c.a_in, c.a_units, c.a_out = (t.data_ptr() for t in f.adapter)
                    c.adapter_rank = f.adapter.rank
                self._routed.append((i, f))

    @classmethod
    def build(cls, w: ModelWeights, scoring_copy: bool = True) -> FusedDecoder | None:
        return cls(w, cpu._lib(), scoring_copy) if cls.supports(w) else None

    @staticmethod
    def supports(w: ModelWeights) -> bool:
        """Whether the compiled step runs every layer of ``w`` (else ``build`` gives None)."""
        lib = cpu._lib()
        if lib is None or not hasattr(lib, "ar_decode_layers") or w.embed.is_cuda or not w.layers:
            return False
        first = w.layers[0]
        for ly in w.layers:  # the scratch buffers are sized once for every layer
            if (ly.ffn.w_gate.shape, ly.wq.shape, ly.wk.shape) != (first.ffn.w_gate.shape, first.wq.shape,
                                                                    first.wk.shape):
                return False
            if ly.qkv_bias is not None or ly.q_norm is not None:
                return False
            if not _plain(ly.attn_norm, ly.wq, ly.wk, ly.wv, ly.wo, ly.mlp_norm):
                return False
            f = ly.ffn
            if isinstance(f, DenseFFN) and not _plain(f.w_gate, f.w_up, f.w_down):
                return False
            if isinstance(f, RoutedFFN):
                x = torch.empty(1, ly.wq.shape[1])
                if not cpu._routable(x, f.w_gate, f.w_up, f.w_down_t, f.shadow_scale, f.unit_bias):
                    return False
                if not f.shadow_q.is_contiguous() or cpu._group_size(x, f.shadow_scale) % 32:
                    return False
                if f.adapter is not None and not _plain(*f.adapter):
                    return False
        if not _plain(w.rope_cos, w.rope_sin):
            return False
        return True

    def _refresh(self, limits: list[int]) -> None:
        """Copies the routed layers' policies in; ``Engine.sparse_limits`` hands out a new list
        whenever any policy changed, so the same list means nothing to copy."""
        if limits is self._limits:
            return
        for i, f in self._routed:
            c = self.layers[i]
            (c.threshold, c.min_units, c.max_units), c.sparse_max_tokens = f.policy(), limits[i]
        self._limits = limits

    def _guard(self, fs: FailSafe, n: int) -> torch.Tensor:
        """Copies the bands in when they changed and sets this step's injected faults; returns the
        fail-safe's scratch [N, H]."""
        bands = fs.bands()
        if bands is not self._bands:
            for i, _ in self._routed:
                self.layers[i].band_lo, self.layers[i].band_hi = bands[i]
            self._bands = bands
        for i, kind in fs.step_faults.items():
            c = self.layers[i]
            c.fault = FAULT_CODES[kind]
            if kind == "scores":
                c.unit_bias = fs.faults.corrupted_bias(i, self.w.layers[i].ffn).data_ptr()
        if n not in self._ffn_out:
            self._ffn_out[n] = torch.empty(n, self.w.hidden)
        return self._ffn_out[n]

    def _unguard(self, fs: FailSafe) -> None:
        for i in fs.step_faults:
            self.layers[i].fault = 0
            self.layers[i].unit_bias = self.w.layers[i].ffn.unit_bias.data_ptr()

    def _buffers(self, n: int):
        if n not in self._scratch:
            w, ly = self.w, self.w.layers[0]
            width = ly.wq.shape[0] + 2 * ly.wk.shape[0]
            units = max(layer.ffn.w_gate.shape[0] for layer in w.layers)
            self._scratch[n] = (torch.empty(n, w.hidden), torch.empty(n, width), torch.empty(n, ly.wq.shape[0]),
                                torch.empty(n, units), torch.empty(len(w.layers), n, dtype=torch.int64))
        return self._scratch[n]

    def __call__(self, x: torch.Tensor, cache: KVCache, batch: int, limits: list[int], fs: FailSafe | None = None,
                 codes: torch.Tensor | None = None, usage: torch.Tensor | None = None) -> torch.Tensor:
        """Updates x [N, H] (N = batch * tokens per sequence) through every layer, writes this step's
        keys and values to the cache; returns units per token [L, N] (-1 for layers run dense).
        ``limits[i]``: most tokens in flight at which layer i runs sparse (``Engine.sparse_limits``).
        With ``fs``, sparse layers run with the fail-safe and leave event codes in codes [L, N]. With
        ``usage`` (``Engine.unit_usage``, [L, F] int64 contiguous), sparse layers add their selections."""
        n = x.shape[0]
        cache.check_room(n // batch)
        if cache.k.dtype != torch.float32:
            raise ValueError(f"the fused CPU decoder needs a float32 KV cache, got {cache.k.dtype}")
        self._refresh(limits)
        h, qkv, attn, hid, counts = self._buffers(n)
        w = self.w
        step = ArStep(x.data_ptr(), h.data_ptr(), qkv.data_ptr(), attn.data_ptr(), hid.data_ptr(), counts.data_ptr(),
                      cache.k.data_ptr(), cache.v.data_ptr(), cache.pad.data_ptr(), w.rope_cos.data_ptr(),
                      w.rope_sin.data_ptr(), len(w.layers), batch, n // batch, w.hidden, w.n_heads, w.n_kv_heads,
                      w.head_dim, cache.max_len, cache.pos, torch.get_num_threads(), cache.k.stride(0), w.eps)
        if fs is not None and self._routed:
            step.failsafe, step.ffn_out = codes.data_ptr(), self._guard(fs, n).data_ptr()
        if usage is not None:
            step.usage = usage.data_ptr()
        try:
            self._fn(self.layers, ctypes.byref(step))
        finally:
            if fs is not None and fs.step_faults:
                self._unguard(fs)
        return counts


def scoring_layout(w: ModelWeights) -> ModelWeights:
    """``w`` with every float32 router's int4 shadow held in the g16 layout only (``cpu.shadow_g16``; the
    rows dropped), where the compiled step runs the model and scores from g16 alone. The layout is a
    permutation of the rows' bytes, so the weights stay the same size, and the step scores without the
    per-engine g16 copy it would otherwise make beside the rows (``Engine.scoring_copy``: 1-5 % of
    float32 routed decode, which the copy's bytes do not leave room for in the memory budget once the
    routed head is held). Paths that read rows make them from g16 (``RoutedFFN.shadow_rows``)."""
    rows = [ly.ffn for ly in w.layers if isinstance(ly.ffn, RoutedFFN) and ly.ffn.shadow_q.numel()]
    float_rows = all(isinstance(t, torch.Tensor) for f in rows for t in (f.w_gate, f.w_up, f.w_down_t))
    if not rows or not float_rows or w.embed.is_cuda or not cpu.scores_from_g16() or not FusedDecoder.supports(w):
        return w
    layers = []
    for ly in w.layers:
        f = ly.ffn
        if isinstance(f, RoutedFFN) and f.shadow_q.numel() and f.shadow_g16 is None:
            g16 = cpu.shadow_g16(f.shadow_q, f.shadow_scale)
            # fresh empty tensors: views of the rows would keep their storage alive
            f = dataclasses.replace(f, shadow_g16=g16, shadow_q=torch.empty(0, f.shadow_q.shape[1], dtype=torch.uint8),
                                    shadow_scale=torch.empty(0, f.shadow_scale.shape[1]))
        layers.append(dataclasses.replace(ly, ffn=f))
    return dataclasses.replace(w, layers=layers)
