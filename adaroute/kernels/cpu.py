"""Multi-threaded CPU kernels for decode (few tokens in flight), built from the C++ sources in ``csrc/``.

Shape letters:
    T  tokens in flight        H  hidden size        M  output rows of a dense weight
    F  FFN units               K  input length of a dense weight
    B  sequences               S  cache slots        D  head dim        N = B*T

Same interface as ``reference``. Inputs with many tokens (prefill) go to PyTorch, whose GEMM is
compute-efficient there; the hand-written GEMV wins only while weight bytes dominate. If the library
cannot be built, every call falls back to the reference with a one-line warning.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
import weakref
from pathlib import Path

import torch

from adaroute.kernels import quant_cpu, reference
from adaroute.kernels.quant_reference import is_quant

NAME = "cpu"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "gemv.cpp", CSRC / "routed_ffn.cpp", CSRC / "attention.cpp", CSRC / "decode_step.cpp",
           CSRC / "quant.cpp", CSRC / "head.cpp"]
# Above this many tokens the weights are reused enough that PyTorch's GEMM is the better tool:
# measured on one core (docs/perf.md), the GEMV is 2x faster up to 8 tokens, even at 12, slower at
# 16. At most kMaxTokens (64), the C side's limit.
MAX_GEMV_TOKENS = 8

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int
_F32 = ctypes.c_float
_SIGNATURES = {
    "ar_linear": [_P, _I64, _I64, _I32, _P, _P, _P, _I64, _I32, _I32],
    "ar_gate_up_silu": [_P, _I64, _I64, _P, _P, _I64, _P, _I32],
    "ar_rmsnorm": [_P, _I64, _I64, _P, _F32, _P],
    "ar_attention": [_P, _I64, _I64, _I64, _I64, _I64, _P, _P, _I64, _I64, _P, _P, _P, _P, _I32],
    "ar_routed_ffn": [_P, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _P, _I64, _P, _F32, _I64, _I64, _I32, _P, _P,
                      _I32, _I32, _I64, _P, _P, _P, _P, _P],
    "ar_router_scores": [_P, _I64, _I64, _I64, _P, _P, _I64, _P, _P, _I32],
    "ar_head_rows": [_P, _I64, _I64, _P, _I64, _P, _I64, _P, _I32],
}


def load_kernels(csrc: Path = CSRC) -> ctypes.CDLL:
    """The kernel library built from the sources in ``csrc`` (built once per source and machine, then
    cached), its functions typed; raises when it cannot be built. ``benchmarks/kernel_ab.py`` loads an
    earlier revision's sources beside the current ones this way."""
    from adaroute.kernels._build import load_library  # noqa: PLC0415 (keeps import of the registry cheap)

    lib = load_library("adaroute_cpu", [csrc / p.name for p in SOURCES], [csrc / "common.h", csrc / "step.h"])
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:
        return load_kernels()
    except Exception as err:  # any build or load failure: stay correct, only slower
        warnings.warn(f"adaroute cpu kernels unavailable ({err}); using the reference kernels", stacklevel=3)
        return None


def _threads() -> int:
    return torch.get_num_threads()


def release_openmp_workers() -> bool:
    """Ends the OpenMP worker threads that the calling thread's parallel regions started.

    libgomp gives every thread that opens a parallel region its own pool of workers. Idle workers
    spin between regions, so the next one starts at once, but only while libgomp manages no more
    threads than there are CPUs; beyond that they sleep after a few hundred spins and every region
    (a decode step opens about a hundred) waits for a wake-up. A server loads its model on one thread
    and decodes on another, which makes two pools: on 2 cores that cost a fifth of decode speed
    (83 -> 63 tok/s, the same engine on a second thread; docs/perf.md). A thread that has finished its
    torch work calls this (OpenMP 5's omp_pause_resource_all, which libgomp implements for the
    calling thread's pool); a later parallel region on it starts a new pool. Returns False where the
    OpenMP runtime has no such call (then nothing changes).
    """
    lib = _lib()
    pause = getattr(lib, "omp_pause_resource_all", None) if lib is not None else None
    if pause is None:
        return False
    pause.argtypes, pause.restype = [_I32], _I32
    return pause(1) == 0  # omp_pause_soft


def is_available() -> bool:
    return _lib() is not None


def uses_native() -> bool:
    """True when calls run the compiled kernels (not the reference fallback)."""
    return _lib() is not None


_F32_DTYPE = torch.float32


def _fast(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """Whether the compiled path applies: float32, contiguous, on CPU, few tokens. (Runs on every
    call, hence the plain loop: this check is a visible share of a decode step's overhead.)"""
    if x.shape[0] > MAX_GEMV_TOKENS or x.dtype is not _F32_DTYPE or not x.is_contiguous() or x.is_cuda:
        return False
    for w in ws:
        if w.dtype is not _F32_DTYPE or not w.is_contiguous():
            return False
    return _lib() is not None


def linear(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w [M, K]^T -> [T, M]; with ``residual`` [T, M] the result is added to it in place."""
    if is_quant(w):  # GGUF blocks (every token count runs compiled there)
        return quant_cpu.linear(x, w, residual)
    if not _fast(x, w) or (residual is not None and not residual.is_contiguous()):
        return reference.linear(x, w, residual)
    return _linear_segments(x, [w], residual)


def head_rows(x: torch.Tensor, head: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """The routed head's exact rows (``reference.head_rows``: logits [T, V] updated in place; the
    rows [T, k] returned, in no particular order within a token)."""
    if (x.dtype is not _F32_DTYPE or head.dtype is not _F32_DTYPE or logits.dtype is not _F32_DTYPE
            or x.is_cuda or not (x.is_contiguous() and head.is_contiguous() and logits.is_contiguous())
            or _lib() is None):
        return reference.head_rows(x, head, logits, k)
    t, v = logits.shape
    idx = torch.empty(t, min(k, v), dtype=torch.int64)
    _lib().ar_head_rows(x.data_ptr(), t, x.shape[1], head.data_ptr(), v, logits.data_ptr(), k, idx.data_ptr(),
                        _threads())
    return idx


def linear_multi(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """Several weights sharing one input in one pass, outputs side by side: [T, sum(M_s)]."""
    if all(map(is_quant, ws)):
        return quant_cpu.linear_multi(x, ws)
    if not _fast(x, *ws):
        return reference.linear_multi(x, ws)
    return _linear_segments(x, ws, None)


def _linear_segments(x, ws, residual):
    t, k = x.shape
    rows = [w.shape[0] for w in ws]
    y = residual if residual is not None else torch.empty(t, sum(rows), dtype=x.dtype)  # [T, sum M]
    n = len(ws)
    ptrs = (ctypes.c_void_p * n)(*[w.data_ptr() for w in ws])
    counts = (ctypes.c_int64 * n)(*rows)
    _lib().ar_linear(x.data_ptr(), t, k, n, ptrs, counts, y.data_ptr(), y.shape[1],
                     int(residual is not None), _threads())
    return y


def gate_up_silu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU input silu(x W_g^T) * (x W_u^T), [T, F], in one pass over both weights."""
    if is_quant(w_gate):
        return quant_cpu.gate_up_silu(x, w_gate, w_up)
    if not _fast(x, w_gate, w_up):
        return reference.gate_up_silu(x, w_gate, w_up)
    t, k = x.shape
    f = w_gate.shape[0]
    h = torch.empty(t, f, dtype=x.dtype)  # [T, F]
    _lib().ar_gate_up_silu(x.data_ptr(), t, k, w_gate.data_ptr(), w_up.data_ptr(), f, h.data_ptr(),
                           _threads())
    return h


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _fast(x, weight):
        return reference.rmsnorm(x, weight, eps)
    out = torch.empty_like(x)  # [T, H]
    _lib().ar_rmsnorm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def dense_ffn(x, w_gate, w_up, w_down, residual=None) -> torch.Tensor:
    """Dense SwiGLU FFN with w_down [H, F] as stored in transformers."""
    return linear(gate_up_silu(x, w_gate, w_up), w_down, residual)


def unit_ffn(x, w_gate, w_up, w_down_t, mask=None, residual=None) -> torch.Tensor:
    """Dense SwiGLU FFN in the unit-contiguous layout (w_down_t [F, H])."""
    if is_quant(w_gate):
        return quant_cpu.unit_ffn(x, w_gate, w_up, w_down_t, mask, residual)
    if mask is not None or not _routable(x, w_gate, w_up, w_down_t) or not _residual_ok(residual):
        return reference.unit_ffn(x, w_gate, w_up, w_down_t, mask, residual)
    empty_u8 = torch.empty(0, dtype=torch.uint8)
    empty_f = torch.empty(0)
    y, _ = _routed_call(x, w_gate, w_up, w_down_t, empty_u8, empty_f, empty_f, -math.inf, 0, 0, residual,
                        all_units=True)
    return y


def routed_ffn(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold: float,
               min_units: int, max_units: int, residual=None,
               adapter: reference.Adapter | None = None,
               usage: torch.Tensor | None = None, scoring_copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused score -> select -> compute (with the routing adapter's low-rank terms for the selected
    units when given). Returns (y [T, H], counts [T] int64); adds the selection to ``usage`` [F] (int64,
    contiguous) when given, as ``reference.add_usage``. ``scoring_copy``: score from the shadow's g16
    copy (``shadow_g16``, made on first use and kept), or, False, from its rows (no copy; slower)."""
    if is_quant(w_gate):
        return quant_cpu.routed_ffn(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold,
                                    min_units, max_units, residual, usage, adapter)
    ok = _routable(x, w_gate, w_up, w_down_t, shadow_scale, unit_bias) and shadow_q.is_contiguous()
    ok = ok and _group_size(x, shadow_scale) % reference.GROUP == 0
    ok = ok and (adapter is None or all(t.dtype is _F32_DTYPE and t.is_contiguous() for t in adapter))
    if not ok or not _residual_ok(residual):
        return reference.routed_ffn(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias,
                                    threshold, min_units, max_units, residual, adapter, usage)
    return _routed_call(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold,
                        min_units, max_units, residual, all_units=False, adapter=adapter, usage=usage,
                        scoring_copy=scoring_copy)


def router_scores(x, shadow_q, shadow_scale, unit_bias) -> torch.Tensor:
    """Scores [T, F] as ``reference.router_scores`` defines them (int8 activations x int4 shadow)."""
    ok = _fast(x, shadow_scale, unit_bias) and shadow_q.is_contiguous() and shadow_q.dtype == torch.uint8
    if not ok or x.shape[1] % reference.GROUP or _group_size(x, shadow_scale) % reference.GROUP:
        return reference.router_scores(x, shadow_q, shadow_scale, unit_bias)
    t, h = x.shape
    f = unit_bias.shape[0]
    out = torch.empty(t, f, dtype=torch.float32)  # [T, F]
    _lib().ar_router_scores(x.data_ptr(), t, h, f, shadow_q.data_ptr(), shadow_scale.data_ptr(),
                            _group_size(x, shadow_scale), unit_bias.data_ptr(), out.data_ptr(), _threads())
    return out


def _routable(x, w_gate, w_up, w_down_t, *others) -> bool:
    """Fast path for float32 weights whose rows are contiguous and share one row stride: plain
    [F, H] tensors, or views into one [F, 3, H] store (``reference.unit_views``)."""
    if not _fast(x, *others) or x.shape[1] % reference.GROUP:
        return False
    ws = (w_gate, w_up, w_down_t)
    stride = w_gate.stride(0)
    return all(w.dtype is _F32_DTYPE and w.stride(1) == 1 and w.stride(0) == stride for w in ws)


def _group_size(x, shadow_scale) -> int:
    # scales [2F, G], or [0, G] where the shadow is held in the g16 layout alone: G still names the group
    return x.shape[1] // shadow_scale.shape[1] if shadow_scale.dim() == 2 and shadow_scale.shape[1] else reference.GROUP


def _residual_ok(residual) -> bool:
    return residual is None or (residual.is_contiguous() and residual.dtype == torch.float32)


def usage_ptr(usage: torch.Tensor | None, units: int) -> int | None:
    """The C kernels' unit-usage argument: a pointer to usage [F], or None (not counted). They add
    int64 counts in place, so any other tensor is an error rather than memory written past its end."""
    if usage is None:
        return None
    if usage.shape != (units,) or usage.dtype != torch.int64 or not usage.is_contiguous() or usage.is_cuda:
        raise ValueError(f"usage must be a contiguous CPU int64 tensor of shape ({units},), "
                         f"got {usage.dtype} {tuple(usage.shape)} on {usage.device}")
    return usage.data_ptr()


def _routed_call(x, w_gate, w_up, w_down_t, shadow_q, shadow_scale, unit_bias, threshold, min_units,
                 max_units, residual, all_units: bool, adapter: reference.Adapter | None = None,
                 usage: torch.Tensor | None = None, scoring_copy: bool = True):
    t, h = x.shape
    f = w_gate.shape[0]
    y = residual if residual is not None else torch.empty(t, h, dtype=x.dtype)  # [T, H]
    counts = torch.empty(t, dtype=torch.int64)  # [T]
    _lib().ar_routed_ffn(
        x.data_ptr(), t, h, f, w_gate.data_ptr(), w_up.data_ptr(), w_down_t.data_ptr(), w_gate.stride(0),
        shadow_q.data_ptr(), shadow_scale.data_ptr(), _group_size(x, shadow_scale), unit_bias.data_ptr(),
        float(threshold), int(min_units), int(max_units), int(all_units), y.data_ptr(), counts.data_ptr(),
        int(residual is not None), _threads(), *_adapter_args(adapter), usage_ptr(usage, f),
        None if all_units or not scoring_copy else shadow_g16(shadow_q, shadow_scale).data_ptr())
    return y, counts


G16_UNITS = 16  # units per record of the g16 shadow layout (one per lane of a 512-bit vector)
# id(shadow_q) -> (weak shadow_q, weak shadow_scale, their versions, g16), dropped when shadow_q dies. Keyed by
# identity: a WeakKeyDictionary compares keys with ==, which for tensors is elementwise.
_G16: dict[int, tuple] = {}


def shadow_g16(shadow_q: torch.Tensor, shadow_scale: torch.Tensor) -> torch.Tensor:
    """The int4 shadow (codes [2F, H/2], scales [2F, G]) in the kernels' decode layout, ``g16``: per 16
    units one record of gate codes [H/8, 16, 4] bytes, up codes likewise, gate scales [G, 16] and up
    scales [G, 16] float32 (bytes), where lane j's 4 bytes of 8-column chunk c hold unit 16g + j's
    nibbles of columns 8c..8c+3 (low) and 8c+4..8c+7 (high); the last record is padded with zero units.
    16 units then score in the lanes of one vector (``routed_ffn.cpp``: ``g16_record``).

    Made once per shadow tensor and kept while it lives (1.25 × the shadow's bytes, ~3 % of a float32
    model), remade when either tensor was modified in place."""
    source = _SOURCE.get(id(shadow_q))
    if source is not None and source[0]() is shadow_q and source[1]() is not None:
        return source[1]()  # rows made from a held g16 tensor: that tensor
    versions = (shadow_q._version, shadow_scale._version)
    hit = _G16.get(id(shadow_q))
    if hit is not None and hit[0]() is shadow_q and hit[1]() is shadow_scale and hit[2] == versions:
        return hit[3]
    two_f, half = shadow_q.shape
    f, h, g = two_f // 2, 2 * half, shadow_scale.shape[1]
    records = -(-f // G16_UNITS)
    pad = records * G16_UNITS - f
    codes = torch.stack((shadow_q & 0xF, shadow_q >> 4), dim=-1).reshape(two_f, h)  # [2F, H] in column order

    def padded(t: torch.Tensor) -> torch.Tensor:  # [F, k] -> [records * 16, k]
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t

    def codes_part(rows: torch.Tensor) -> torch.Tensor:  # [F, H] -> [records, 16 * H/2] bytes
        c = padded(rows).view(records, G16_UNITS, h // 8, 8)
        return (c[..., :4] | (c[..., 4:] << 4)).permute(0, 2, 1, 3).reshape(records, -1)

    def scales_part(s: torch.Tensor) -> torch.Tensor:  # [F, G] -> [records, G * 16 * 4] bytes
        s = padded(s.float()).view(records, G16_UNITS, g).permute(0, 2, 1).contiguous()
        return s.view(torch.uint8).reshape(records, -1)

    packed = torch.cat([codes_part(codes[:f]), codes_part(codes[f:]), scales_part(shadow_scale[:f]),
                        scales_part(shadow_scale[f:])], dim=1).contiguous()
    if hit is None or hit[0]() is not shadow_q:
        weakref.finalize(shadow_q, _G16.pop, id(shadow_q), None)
    _G16[id(shadow_q)] = (weakref.ref(shadow_q), weakref.ref(shadow_scale), versions, packed)
    return packed


_ROWS: dict[int, tuple] = {}
_SOURCE: dict[int, tuple] = {}  # id(rows made by rows_from_g16) -> (their codes, the g16 they came from)


def rows_from_g16(g16: torch.Tensor, units: int, hidden: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row layout (codes [2F, H/2] uint8, scales [2F, G] float32) of a g16 shadow: the inverse of
    ``shadow_g16`` (a permutation of bytes), for the paths that read rows when only g16 is held. Made
    once per g16 tensor and kept while it lives; ``shadow_g16`` of the rows is then that tensor again."""
    hit = _ROWS.get(id(g16))  # held g16 tensors are never written in place: no version check
    if hit is not None and hit[0]() is g16:
        return hit[1]
    rows = _g16_to_rows(g16, units, hidden, groups)
    if hit is None or hit[0]() is not g16:
        weakref.finalize(g16, _ROWS.pop, id(g16), None)
    _ROWS[id(g16)] = (weakref.ref(g16), rows)
    _SOURCE[id(rows[0])] = (weakref.ref(rows[0]), weakref.ref(g16))  # weak both ways: no cycle
    weakref.finalize(rows[0], _SOURCE.pop, id(rows[0]), None)
    return rows


def _g16_to_rows(g16: torch.Tensor, units: int, hidden: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    records, h, g = g16.shape[0], hidden, groups

    def codes_rows(part: torch.Tensor) -> torch.Tensor:  # [records, 8H] bytes -> [F, H/2] row codes
        b = part.reshape(records, h // 8, G16_UNITS, 4).permute(0, 2, 1, 3)  # [R, 16, H/8, 4]
        c = torch.cat([b & 0xF, b >> 4], dim=-1).reshape(records * G16_UNITS, h)[:units]  # nibbles, column order
        return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()

    def scale_rows(part: torch.Tensor) -> torch.Tensor:  # [records, 64G] bytes -> [F, G]
        s = part.contiguous().view(torch.float32).reshape(records, g, G16_UNITS).permute(0, 2, 1)
        return s.reshape(records * G16_UNITS, g)[:units]

    cut = [8 * h, 16 * h, 16 * h + 64 * g]
    gc, uc, gs, us = g16[:, :cut[0]], g16[:, cut[0]:cut[1]], g16[:, cut[1]:cut[2]], g16[:, cut[2]:]
    return (torch.cat([codes_rows(gc), codes_rows(uc)]).contiguous(),
            torch.cat([scale_rows(gs), scale_rows(us)]).contiguous())


def scores_from_g16() -> bool:
    """Whether the compiled routed FFN scores from the g16 layout alone (AVX-512 BW build), so that
    weights may hold a router's shadow in that layout only (``runtime.fused_cpu.scoring_layout``)."""
    lib = _lib()
    return lib is not None and hasattr(lib, "ar_scores_g16") and bool(lib.ar_scores_g16())


def _adapter_args(adapter: reference.Adapter | None) -> tuple:
    """rank, w_in, w_units, w_out pointers for ar_routed_ffn (rank 0: no adapter)."""
    if adapter is None:
        return 0, None, None, None
    return (adapter.rank, *(t.data_ptr() for t in adapter))


def attention(qkv, k_cache, v_cache, cos, sin, pos: int, pad: torch.Tensor | None, n_heads: int) -> torch.Tensor:
    """Grouped-query attention over the cache with RoPE and the cache write fused (see reference)."""
    b, n_kv, s_max, d = k_cache.shape
    t = qkv.shape[0] // b
    if not _fast(qkv, k_cache, v_cache, cos, sin) or t > MAX_GEMV_TOKENS or pos + t > s_max:
        return reference.attention(qkv, k_cache, v_cache, cos, sin, pos, pad, n_heads)
    if pos + t > cos.shape[0]:
        raise ValueError(f"position {pos + t - 1} beyond the {cos.shape[0]} RoPE positions")
    pad = torch.zeros(b, dtype=torch.int64) if pad is None else pad.to(torch.int64).contiguous()
    out = torch.empty(b * t, n_heads * d, dtype=qkv.dtype)  # [N, Q*D]
    _lib().ar_attention(qkv.data_ptr(), b, t, n_heads, n_kv, d, k_cache.data_ptr(), v_cache.data_ptr(), s_max,
                        pos, pad.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), _threads())
    return out
