// Shared pieces of the decode kernels: row dot products and row updates that stream weights.
//
// Shape letters:
//   T  tokens in flight (decode: 1 per sequence)     H  hidden size (input length of every row)
//   M  output rows of a dense weight                   F  FFN units (gate/up rows, down columns)
//
// Decode reads every weight byte once per token, so these kernels are memory-bound: the aim is to
// stream each selected row exactly once, reuse it for all T tokens, and keep enough independent
// FMA chains in flight that the loads, not the FMA latency, set the pace.
// Plain C ABI (called through ctypes) so the library builds in seconds without framework headers.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int kTokBlock = 4;   // tokens sharing one load of a weight row
constexpr int kMaxTokens = 64; // per call; callers split larger batches
constexpr int kChunk = 32;     // rows (or units) handed out to a thread at a time
constexpr int kAhead = 2;      // rows (units) ahead that software prefetch runs in scattered reads
constexpr int64_t kStreamAhead = 4096;  // floats (16 KB) ahead that prefetch runs in a contiguous stream

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

#ifdef __AVX512F__
// exp for 16 lanes (Cephes-style, ~1e-7 relative): scalar libm calls per element cost as much as the
// memory traffic of the router scores and attention softmax they serve.
inline __m512 vexp(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(90.0f)), _mm512_set1_ps(-110.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}
#endif

// This thread's share [lo, hi) of m rows (or units, or records): contiguous and equal. Decode calls
// stream their weights at about the same pace on every thread, so a static split costs little balance,
// and it keeps each thread's stream one contiguous run that software prefetch can lead by kStreamAhead
// (docs/perf.md, items 27 and 29).
inline void thread_share(int64_t m, int64_t& lo, int64_t& hi) {
  const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
  lo = m * tid / team, hi = m * (tid + 1) / team;
}

// The row to prefetch while row ``row`` (length k) of a contiguous stream ending at ``end`` is read:
// kStreamAhead floats on, held inside the stream (its last row once the lead runs past the end).
inline const float* stream_ahead(const float* row, int64_t k, const float* end) {
  return std::max(row, std::min(row + kStreamAhead, end - k));
}

// out[t] = dot(w, x[t]) for NT tokens; x rows are ldx apart.
// One row at a time, front to back: a single sequential stream is what the hardware prefetcher
// follows best (four interleaved rows reached ~60 % of the bandwidth of this form). Independent FMA
// chains come from splitting the row into S interleaved partial sums instead.
// ``ahead`` (may be null) is a row needed soon: its lines are requested into L2 as this row streams.
template <int NT>
inline void dot_row(const float* w, const float* x, int64_t ldx, int64_t k, float* out, const float* ahead) {
#ifdef __AVX512F__
  constexpr int S = NT == 1 ? 4 : 2;
  __m512 acc[S][NT];
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < NT; ++t) acc[s][t] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 16 * S <= k; kk += 16 * S)
    for (int s = 0; s < S; ++s) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + kk + 16 * s), _MM_HINT_T1);
      const __m512 wv = _mm512_loadu_ps(w + kk + 16 * s);
      for (int t = 0; t < NT; ++t)
        acc[s][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ldx + kk + 16 * s), acc[s][t]);
    }
  for (; kk + 16 <= k; kk += 16) {
    const __m512 wv = _mm512_loadu_ps(w + kk);
    for (int t = 0; t < NT; ++t) acc[0][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ldx + kk), acc[0][t]);
  }
  if (kk < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - kk)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(m, w + kk);
    for (int t = 0; t < NT; ++t)
      acc[0][t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + t * ldx + kk), acc[0][t]);
  }
  for (int t = 0; t < NT; ++t) {
    __m512 sum = acc[0][t];
    for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][t]);
    out[t] = _mm512_reduce_add_ps(sum);
  }
#else
  (void)ahead;
  for (int t = 0; t < NT; ++t) {
    const float* xt = x + t * ldx;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t kk = 0; kk < k; ++kk) s += w[kk] * xt[kk];
    out[t] = s;
  }
#endif
}

// dot(w, x[t]) for any token count; out[t], t < nt. Only the first pass over w prefetches ``ahead``.
inline void dot_tokens(const float* w, const float* x, int64_t ldx, int64_t k, int64_t nt, float* out,
                       const float* ahead) {
  for (int64_t t0 = 0; t0 < nt; t0 += kTokBlock) {
    const float* xt = x + t0 * ldx;
    const float* pf = t0 == 0 ? ahead : nullptr;
    switch (std::min<int64_t>(kTokBlock, nt - t0)) {
      case 4: dot_row<4>(w, xt, ldx, k, out + t0, pf); break;
      case 3: dot_row<3>(w, xt, ldx, k, out + t0, pf); break;
      case 2: dot_row<2>(w, xt, ldx, k, out + t0, pf); break;
      default: dot_row<1>(w, xt, ldx, k, out + t0, pf); break;
    }
  }
}

// usage[i] += tokens of mask [T, F] that selected unit i (usage null: not counted). The runtime's
// per-layer unit-usage counter (Engine.unit_usage); reference.add_usage defines it.
inline void add_usage(const uint8_t* mask, int64_t nt, int64_t f, int64_t* usage) {
  if (usage == nullptr) return;
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t i = 0; i < f; ++i) usage[i] += mask[t * f + i];
}

// y[t] += a[t] * row for nt tokens; y rows are ldy apart. ``ahead`` as in dot_row.
inline void axpy_tokens(const float* row, const float* a, int nt, float* y, int64_t ldy, int64_t h,
                        const float* ahead) {
#ifdef __AVX512F__
  if (ahead)
    for (int64_t kk = 0; kk < h; kk += 16) _mm_prefetch(reinterpret_cast<const char*>(ahead + kk), _MM_HINT_T1);
#else
  (void)ahead;
#endif
  for (int t = 0; t < nt; ++t) {
    if (a[t] == 0.0f) continue;  // unit not selected for this token
    float* yt = y + t * ldy;
    const float at = a[t];
#ifdef __AVX512F__
    const __m512 av = _mm512_set1_ps(at);
    int64_t kk = 0;
    for (; kk + 16 <= h; kk += 16)
      _mm512_storeu_ps(yt + kk, _mm512_fmadd_ps(av, _mm512_loadu_ps(row + kk), _mm512_loadu_ps(yt + kk)));
    for (; kk < h; ++kk) yt[kk] += at * row[kk];
#else
#pragma omp simd
    for (int64_t kk = 0; kk < h; ++kk) yt[kk] += at * row[kk];
#endif
  }
}

}  // namespace
