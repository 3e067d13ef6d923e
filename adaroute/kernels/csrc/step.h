// The decode step's shared state and the per-token fail-safe of sparse routed layers, used by the
// float32 decoder (decode_step.cpp) and the block-quantised one (quant.cpp). ArStep is mirrored by a
// ctypes structure in adaroute/runtime/fused_cpu.py (field order and types must match).
#pragma once

#include "common.h"

#include <stdexcept>

struct ArStep {
  float* x;                          // [N, H] residual stream, updated in place
  float *h, *qkv, *attn, *hid;       // scratch: [N, H], [N, (Q+2K)*D], [N, Q*D], [N, F]
  int64_t* counts;                   // [L, N]: units per token of layers that ran sparse, -1 elsewhere
  float *k_cache, *v_cache;          // [L, B, K, S, D]
  const int64_t* pad;                // [B]
  const float *cos, *sin;            // [positions, D]
  int64_t n_layers, b, t, hidden, n_heads, n_kv, head_dim, s_max, pos, nthreads;
  int64_t layer_stride;              // floats from one layer's cache to the next (the batch may be a
                                     // prefix of a larger cache: B*K*S*D only when it is not)
  float eps;
  int64_t* failsafe;                 // [L, N] fail-safe event codes (null: fail-safe off)
  float* ffn_out;                    // scratch [N, H]: a sparse FFN's output before it is checked
  int64_t* usage;                    // [L, F] unit-usage counter (null: off): sparse layers add their selections
};

namespace {

// Layer i's row of the unit-usage counter, or null when it is off (every layer has `units` units).
inline int64_t* usage_row(const ArStep* s, int64_t units, int64_t i) {
  return s->usage ? s->usage + i * units : nullptr;
}

// Fail-safe of a sparse routed layer (adaroute/runtime/failsafe.py is its reference): the sparse
// output goes to scratch; a token whose selection leaves [band_lo, band_hi] (code 1) or whose output
// is not finite (2), or every token when the kernel throws (3), is recomputed with every unit.
// The unit-usage counter gets the router's selection, also for tokens recomputed densely (nothing when
// the kernel throws), as FailSafe.routed_ffn counts it. ``sparse(out, counts, usage)`` runs the layer's
// sparse FFN into out [N, H]; ``dense(out, counts)`` the original FFN with every unit. fault: an
// injected fault of this step (2: the sparse kernel throws, 3: NaN out).
template <class Sparse, class Dense>
void routed_failsafe(const ArStep* s, int64_t i, int64_t units, int64_t band_lo, int64_t band_hi, int64_t fault,
                     int64_t* counts, Sparse sparse, Dense dense) {
  const int64_t n = s->b * s->t, hd = s->hidden;
  int64_t* code = s->failsafe + i * n;
  float* out = s->ffn_out;
  bool failed = false;
  try {
    if (fault == 2) throw std::runtime_error("fault injected into the sparse kernel");
    sparse(out, counts, usage_row(s, units, i));
    if (fault == 3) out[0] = NAN;
  } catch (...) {
    failed = true;
  }
  int64_t bad = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float* row = out + t * hd;
    bool finite = true;
    for (int64_t k = 0; k < hd && !failed; ++k) finite = finite && std::isfinite(row[k]);
    code[t] = failed ? 3 : !finite ? 2 : (counts[t] < band_lo || counts[t] > band_hi) ? 1 : 0;
    bad += code[t] != 0;
    if (code[t] == 0)
      for (int64_t k = 0; k < hd; ++k) s->x[t * hd + k] += row[k];
  }
  if (bad == 0) return;
  std::vector<int64_t> every(n);
  dense(out, every.data());  // the fail-safe is the original dense FFN
  for (int64_t t = 0; t < n; ++t)
    if (code[t] != 0) {
      for (int64_t k = 0; k < hd; ++k) s->x[t * hd + k] += out[t * hd + k];
      counts[t] = units;
    }
}

}  // namespace
