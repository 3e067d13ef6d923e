"""Compiled CPU products with block-quantised weights (``csrc/quant.cpp``), same interface as the
dense ones in ``cpu`` for ``QuantWeight`` arguments; ``quant_reference`` defines the result.

Shape letters:
    T  tokens in flight     K  input length     M  output rows     F  FFN units

Every token count runs here (prefill too): the integer dot products are cheap enough that reusing each
row of blocks for up to 64 tokens beats unpacking the weights for a float GEMM; longer inputs go
through in slices of 64. Without the compiled library, the reference runs.
"""

from __future__ import annotations

import ctypes

import torch

from adaroute.kernels import quant_reference as qr
from adaroute.kernels.quant_reference import BLOCK, QuantWeight

FMT_CODES = {"f32": 0, "q8_0": 1, "q4_0": 2, "q4_1": 3}  # csrc/quant.cpp's Fmt
G16 = 16  # csrc/quant.cpp's kG16: added to a format code for a weight in the g16 layout
SLICE = 64  # tokens per call: kMaxTokens on the C side

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "ar_qlinear": [_P, _I64, _I64, _I32, _P, _P, _P, _P, _I64, _I32, _I32],
    "ar_qgate_up_silu": [_P, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _I32],
    "ar_qrouted_ffn": [_P, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _I64, _P, ctypes.c_float, _I64, _I64,
                       _I32, _P, _P, _I32, _I32, _P, _I64, _P, _P, _P],
}


def fmt_code(w: QuantWeight) -> int:
    """The kernels' code for a weight's format and layout."""
    return FMT_CODES[w.fmt] + (G16 if w.layout == "g16" else 0)


def _lib():
    from adaroute.kernels import cpu  # noqa: PLC0415 (one library for every CPU kernel)

    lib = cpu._lib()
    if lib is None or not hasattr(lib, "ar_qlinear"):
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        if fn.argtypes is None:
            fn.argtypes, fn.restype = argtypes, None
    return lib


def _ok(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.is_contiguous() and not x.is_cuda and _lib() is not None


def linear(x: torch.Tensor, w: QuantWeight, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w^T -> [T, M] (adds into ``residual`` [T, M] in place when given)."""
    if not _ok(x) or (residual is not None and not residual.is_contiguous()):
        return qr.linear(x, w, residual)
    return _segments(x, [w], residual)


def linear_multi(x: torch.Tensor, ws: list[QuantWeight]) -> torch.Tensor:
    """Several quantised weights sharing one input in one pass, outputs side by side: [T, sum M_s]."""
    if not _ok(x):
        return torch.cat([qr.linear(x, w) for w in ws], dim=-1)
    return _segments(x, ws, None)


def gate_up_silu(x: torch.Tensor, w_gate: QuantWeight, w_up: QuantWeight) -> torch.Tensor:
    if not _ok(x) or w_gate.layout != w_up.layout:
        return torch.nn.functional.silu(qr.linear(x, w_gate)) * qr.linear(x, w_up)
    t, k = x.shape
    f = w_gate.shape[0]
    h = torch.empty(t, f)  # [T, F]
    for t0 in range(0, t, SLICE):
        xs, hs = x[t0:t0 + SLICE], h[t0:t0 + SLICE]
        _lib().ar_qgate_up_silu(xs.data_ptr(), xs.shape[0], k, w_gate.data_ptr(), w_up.data_ptr(),
                                fmt_code(w_gate), fmt_code(w_up), f, hs.data_ptr(), torch.get_num_threads())
    return h


def dense_ffn(x, w_gate: QuantWeight, w_up: QuantWeight, w_down: QuantWeight, residual=None) -> torch.Tensor:
    return linear(gate_up_silu(x, w_gate, w_up), w_down, residual)


def _segments(x: torch.Tensor, ws: list[QuantWeight], residual: torch.Tensor | None) -> torch.Tensor:
    t, k = x.shape
    rows = [w.shape[0] for w in ws]
    y = residual if residual is not None else torch.empty(t, sum(rows))  # [T, sum M]
    n = len(ws)
    ptrs = (ctypes.c_void_p * n)(*[w.data_ptr() for w in ws])
    counts = (ctypes.c_int64 * n)(*rows)
    fmts = (ctypes.c_int64 * n)(*[fmt_code(w) for w in ws])
    for t0 in range(0, t, SLICE):
        xs, ys = x[t0:t0 + SLICE], y[t0:t0 + SLICE]
        _lib().ar_qlinear(xs.data_ptr(), xs.shape[0], k, n, ptrs, counts, fmts, ys.data_ptr(), y.shape[1],
                          int(residual is not None), torch.get_num_threads())
    return y


def half_adapter(adapter):
    """A routing adapter as the quantised kernels read it: float16, contiguous (``reference.Adapter``)."""
    from adaroute.kernels.reference import Adapter  # noqa: PLC0415

    return Adapter(*(t.detach().to(torch.float16).contiguous() for t in adapter))


def float_adapter(adapter):
    """The same adapter in float32 (exactly: every float16 value is a float32 one), for references."""
    from adaroute.kernels.reference import Adapter  # noqa: PLC0415

    return Adapter(*(t.float() for t in adapter))


def unit_stride(w_gate: QuantWeight, w_up: QuantWeight, w_down_t: QuantWeight) -> int | None:
    """Bytes from one unit's rows to the next when all three share one row stride (unit-packed or
    three contiguous tensors of one format), else None. Gate and up share a format; the down rows
    may have their own (q8_0 under 4-bit gate/up). With gate and up in the g16 layout (the exact
    router's), the down rows' stride."""
    ws = (w_gate, w_up, w_down_t)
    if w_gate.fmt != w_up.fmt or w_gate.layout != w_up.layout or any(w.data.stride(-1) != 1 for w in ws):
        return None
    if w_gate.layout == "g16":  # down rows by unit, or the down projection itself in g16 (stride unused)
        return w_down_t.data.stride(0) if all(w.data.is_contiguous() for w in ws) else None
    if w_down_t.layout != "rows":
        return None
    strides = {w.data.stride(0) for w in ws}
    return strides.pop() if len(strides) == 1 else None


def unit_ffn(x, w_gate: QuantWeight, w_up: QuantWeight, w_down_t: QuantWeight, mask=None, residual=None):
    """Dense SwiGLU FFN in the unit layout (w_down_t [F, H] as blocks along H, or [H, F] g16 as in
    ``routed_ffn``)."""
    y, _ = _routed(x, w_gate, w_up, w_down_t, None, None, None, float("-inf"), 0, w_gate.shape[0], residual,
                   all_units=True, mask=mask)
    return y


def routed_ffn(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold: float, min_units: int,
               max_units: int, residual=None, usage: torch.Tensor | None = None, adapter=None,
               scoring_copy: bool = True):
    """Score -> select -> the selected quantised units. Scores from the int4 shadow (as
    ``reference.router_scores``) or, when ``shadow_q`` is empty, from exact gate and up
    (``quant_reference.exact_scores``: every gate/up row is read). ``w_down_t``: the down columns
    by unit [F, H] (rows layout: only the selected units' rows are read) or, with g16 gate/up, the
    down projection itself [H, F] in the g16 layout, applied densely to the activations with the
    unselected units' set to 0 (``round_activations`` of them, as every g16 product). ``usage`` [F]
    int64: the selection is added to it, as ``reference.add_usage``. ``adapter``
    (``reference.Adapter``; exact router only; held in float16, a float32 one rounded to it): its
    low-rank terms for the selected units, as ``reference.unit_ffn`` applies them, on the activations
    the g16 products saw. ``scoring_copy``: the float32 kernels' layout choice, not used here."""
    return _routed(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold, min_units, max_units,
                   residual, all_units=False, usage=usage, adapter=adapter)


def _routed(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold, min_units, max_units,
            residual, all_units: bool, mask=None, usage=None, adapter=None):
    from adaroute.kernels import reference  # noqa: PLC0415
    from adaroute.kernels.cpu import usage_ptr  # noqa: PLC0415 (cpu imports this module)

    ldw = unit_stride(w_gate, w_up, w_down_t)
    exact = not all_units and shadow_q.numel() == 0
    if (w_gate.layout == "g16" or w_down_t.layout == "g16") and not (exact or all_units):
        raise ValueError("gate/up in the g16 layout run with the exact router only (empty shadow_q)")
    if w_down_t.layout == "g16" and w_gate.layout != "g16":
        raise ValueError("a g16 down projection [H, F] runs with g16 gate/up (the exact router's layout)")
    if adapter is not None and not exact:
        raise ValueError("routing adapters on quantised units run with the exact router only (empty shadow_q)")
    if adapter is not None:  # the kernels hold adapters in float16 (a float32 one is rounded to it)
        adapter = half_adapter(adapter)
    adapter_ok = adapter is None or all(t.is_contiguous() for t in adapter)
    if mask is not None or ldw is None or not _ok(x) or (residual is not None and not residual.is_contiguous()) \
            or not adapter_ok:
        ws = [w.dequantize() for w in (w_gate, w_up, w_down_t)]  # fallback: float copies, one layer at a time
        if w_down_t.layout == "g16":  # the down projection itself, [H, F]
            ws[2] = ws[2].t()
        if all_units:
            return reference.unit_ffn(x, *ws, mask, residual), None
        if exact:
            mask = reference.select_units(qr.exact_scores(x, *ws[:2], unit_bias), threshold, min_units, max_units)
            reference.add_usage(usage, mask)
            return reference.unit_ffn(x, *ws, mask, residual, adapter and float_adapter(adapter)), mask.sum(-1)
        return reference.routed_ffn(x, *ws, shadow_q, shadow_scale, unit_bias, threshold, min_units, max_units,
                                    residual, usage=usage)
    t, h = x.shape
    f = w_gate.shape[0]
    y = residual if residual is not None else torch.empty(t, h)  # [T, H]
    counts = torch.empty(t, dtype=torch.int64)  # [T]
    group = h // shadow_scale.shape[1] if shadow_scale is not None and shadow_scale.shape[1] else BLOCK
    usage_p = None if all_units else usage_ptr(usage, f)
    router = [0 if r is None or r.numel() == 0 else r.data_ptr() for r in (shadow_q, shadow_scale, unit_bias)]
    adapter_args = (0, None, None, None) if adapter is None else (adapter.rank, *(a.data_ptr() for a in adapter))
    for t0 in range(0, t, SLICE):  # selection is per token, so slices of tokens are exact
        xs, ys, cs = x[t0:t0 + SLICE], y[t0:t0 + SLICE], counts[t0:t0 + SLICE]
        _lib().ar_qrouted_ffn(xs.data_ptr(), xs.shape[0], h, f, w_gate.data_ptr(), w_up.data_ptr(),
                              w_down_t.data_ptr(), ldw, fmt_code(w_gate), fmt_code(w_down_t), router[0],
                              router[1], group, router[2],
                              float(threshold), int(min_units), int(max_units), int(all_units), ys.data_ptr(),
                              cs.data_ptr(), int(residual is not None), torch.get_num_threads(), usage_p,
                              *adapter_args)
    return y, counts
