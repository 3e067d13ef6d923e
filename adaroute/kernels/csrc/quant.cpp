// Block-quantised decode kernels: float32 activations x GGUF blocks (q8_0, q4_0, q4_1), read in place.
//
// Shape letters:
//   T  tokens in flight   K  input length (multiple of 32)   M  output rows   B = K / 32 blocks per row
//
// The product is x @ dequantize(w)^T (adaroute/kernels/quant_reference.py): each block is expanded
// to 32 floats in registers (w = d * q, d * (n - 8) or d * n + m) and multiplied with float32
// activations, so a quantised model computes what its dequantised float32 twin computes, to float
// rounding. Weights stay in the file's array-of-blocks layout (a row of blocks per output row): a row
// is one sequential stream, and it is expanded once per block for every token in flight.
// Quantising the activations to int8 as well (llama.cpp's choice, VNNI dot products) was measured
// and not kept: it moved the embedded model's perplexity by 0.16 % (docs/perf.md, item 16).
#include "common.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

enum Fmt : int64_t { kF32 = 0, kQ8_0 = 1, kQ4_0 = 2, kQ4_1 = 3 };
constexpr int kBlock = 32;

inline int64_t block_bytes(int64_t fmt) { return fmt == kQ8_0 ? 34 : fmt == kQ4_0 ? 18 : 20; }

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while (!(m & 0x400));
    bits = sign | ((112 - e) << 23) | ((m & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// A block's scale and minimum: w = d * c + m over its codes c (q8: q, q4_0: n, m = -8 d; q4_1: n).
template <int64_t FMT>
inline void block_affine(const uint8_t* blk, float& d, float& m) {
  d = half_to_float(blk);
  m = FMT == kQ4_1 ? half_to_float(blk + 2) : FMT == kQ4_0 ? -8.0f * d : 0.0f;
}

#ifdef __AVX512F__
// The 32 weights of a block as two vectors of 16 floats (elements 0-15, 16-31).
template <int64_t FMT>
inline void expand_block(const uint8_t* blk, __m512& w0, __m512& w1) {
  float d, m;
  block_affine<FMT>(blk, d, m);
  const __m512 dv = _mm512_set1_ps(d);
  if constexpr (FMT == kQ8_0) {
    const __m128i* q = reinterpret_cast<const __m128i*>(blk + 2);
    w0 = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    w1 = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
  } else {
    const __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (FMT == kQ4_1 ? 4 : 2))));
    const __m512 mv = _mm512_set1_ps(m);
    w0 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_and_si512(n, _mm512_set1_epi32(0xf))), mv);
    w1 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_srli_epi32(n, 4)), mv);
  }
}

// out[t] = row . x[t] for NT tokens (x rows ldx apart). Four accumulators per token (two halves of a
// block times even/odd blocks) keep independent FMA chains in flight when NT is small.
template <int64_t FMT, int NT>
inline void qdot_row(const uint8_t* row, const float* x, int64_t ldx, int64_t nb, float* out) {
  constexpr int64_t J = FMT == kQ8_0 ? 34 : FMT == kQ4_0 ? 18 : 20;
  __m512 acc[4][NT];
  for (int a = 0; a < 4; ++a)
    for (int t = 0; t < NT; ++t) acc[a][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 w0, w1;
    expand_block<FMT>(row + b * J, w0, w1);
    const int a = static_cast<int>(b & 1) * 2;
    for (int t = 0; t < NT; ++t) {
      const float* xb = x + t * ldx + b * kBlock;
      acc[a][t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[a][t]);
      acc[a + 1][t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[a + 1][t]);
    }
  }
  for (int t = 0; t < NT; ++t)
    out[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]),
                                                _mm512_add_ps(acc[2][t], acc[3][t])));
}
#else
template <int64_t FMT>
inline void expand_block(const uint8_t* blk, float* w) {
  float d, m;
  block_affine<FMT>(blk, d, m);
  if constexpr (FMT == kQ8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < kBlock; ++j) w[j] = d * q[j];
  } else {
    const uint8_t* p = blk + (FMT == kQ4_1 ? 4 : 2);
    for (int j = 0; j < 16; ++j) {
      w[j] = d * static_cast<float>(p[j] & 0xf) + m;
      w[j + 16] = d * static_cast<float>(p[j] >> 4) + m;
    }
  }
}

template <int64_t FMT, int NT>
inline void qdot_row(const uint8_t* row, const float* x, int64_t ldx, int64_t nb, float* out) {
  constexpr int64_t J = FMT == kQ8_0 ? 34 : FMT == kQ4_0 ? 18 : 20;
  float acc[NT] = {};
  float w[kBlock];
  for (int64_t b = 0; b < nb; ++b) {
    expand_block<FMT>(row + b * J, w);
    for (int t = 0; t < NT; ++t) {
      const float* xb = x + t * ldx + b * kBlock;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int j = 0; j < kBlock; ++j) s += w[j] * xb[j];
      acc[t] += s;
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = acc[t];
}
#endif

template <int64_t FMT>
inline void qdot_fmt(const uint8_t* row, const float* x, int64_t ldx, int64_t nb, int64_t t_count, float* out) {
  for (int64_t t0 = 0; t0 < t_count; t0 += kTokBlock) {
    const float* xt = x + t0 * ldx;
    switch (std::min<int64_t>(kTokBlock, t_count - t0)) {
      case 4: qdot_row<FMT, 4>(row, xt, ldx, nb, out + t0); break;
      case 3: qdot_row<FMT, 3>(row, xt, ldx, nb, out + t0); break;
      case 2: qdot_row<FMT, 2>(row, xt, ldx, nb, out + t0); break;
      default: qdot_row<FMT, 1>(row, xt, ldx, nb, out + t0); break;
    }
  }
}

// out[t] = row . x[t] for every token, dispatching on the format once per row.
inline void qdot_tokens(const uint8_t* row, int64_t fmt, const float* x, int64_t k, int64_t t_count, float* out) {
  const int64_t nb = k / kBlock;
  switch (fmt) {
    case kQ8_0: qdot_fmt<kQ8_0>(row, x, k, nb, t_count, out); break;
    case kQ4_0: qdot_fmt<kQ4_0>(row, x, k, nb, t_count, out); break;
    default: qdot_fmt<kQ4_1>(row, x, k, nb, t_count, out); break;
  }
}

}  // namespace

extern "C" {

// y[t, col0(s) + m] (+)= ws[s][m] . x[t] for every segment s (segments side by side in y, as ar_linear).
void ar_qlinear(const float* x, int64_t t_count, int64_t k, int nseg, const uint8_t* const* ws, const int64_t* rows,
                const int64_t* fmts, float* y, int64_t ldy, int accumulate, int nthreads) {
  const int64_t nb = k / kBlock;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t col0 = 0;
    for (int s = 0; s < nseg; ++s) {
      const int64_t m = rows[s], stride = nb * block_bytes(fmts[s]);
#pragma omp for schedule(dynamic, kChunk) nowait
      for (int64_t r = 0; r < m; ++r) {
        float out[kMaxTokens];
        qdot_tokens(ws[s] + r * stride, fmts[s], x, k, t_count, out);
        for (int64_t t = 0; t < t_count; ++t) {
          float* dst = y + t * ldy + col0 + r;
          *dst = accumulate ? *dst + out[t] : out[t];
        }
      }
      col0 += m;
    }
  }
}

// h[t, i] = silu(w_gate[i] . x[t]) * (w_up[i] . x[t]) with block-quantised gate and up.
void ar_qgate_up_silu(const float* x, int64_t t_count, int64_t k, const uint8_t* wg, const uint8_t* wu, int64_t fmt_g,
                      int64_t fmt_u, int64_t f, float* h, int nthreads) {
  const int64_t nb = k / kBlock, sg = nb * block_bytes(fmt_g), su = nb * block_bytes(fmt_u);
#pragma omp parallel for schedule(dynamic, kChunk) num_threads(nthreads)
  for (int64_t i = 0; i < f; ++i) {
    float g[kMaxTokens], u[kMaxTokens];
    qdot_tokens(wg + i * sg, fmt_g, x, k, t_count, g);
    qdot_tokens(wu + i * su, fmt_u, x, k, t_count, u);
    for (int64_t t = 0; t < t_count; ++t) h[t * f + i] = silu(g[t]) * u[t];
  }
}

}  // extern "C"

// ---- routed FFN over block-quantised units ------------------------------------------------------
namespace {

// y[t] += a[t] * dequantize(row) for every token with a[t] != 0 (a row of H/32 blocks).
template <int64_t FMT>
inline void qaxpy_row(const uint8_t* row, const float* a, int64_t t_count, float* y, int64_t h) {
  constexpr int64_t J = FMT == kQ8_0 ? 34 : FMT == kQ4_0 ? 18 : 20;
  const int64_t nb = h / kBlock;
#ifdef __AVX512F__
  for (int64_t b = 0; b < nb; ++b) {
    __m512 w0, w1;
    expand_block<FMT>(row + b * J, w0, w1);
    for (int64_t t = 0; t < t_count; ++t) {
      if (a[t] == 0.0f) continue;
      float* yb = y + t * h + b * kBlock;
      const __m512 av = _mm512_set1_ps(a[t]);
      _mm512_storeu_ps(yb, _mm512_fmadd_ps(av, w0, _mm512_loadu_ps(yb)));
      _mm512_storeu_ps(yb + 16, _mm512_fmadd_ps(av, w1, _mm512_loadu_ps(yb + 16)));
    }
  }
#else
  float w[kBlock];
  for (int64_t b = 0; b < nb; ++b) {
    expand_block<FMT>(row + b * J, w);
    for (int64_t t = 0; t < t_count; ++t) {
      if (a[t] == 0.0f) continue;
      float* yb = y + t * h + b * kBlock;
      for (int j = 0; j < kBlock; ++j) yb[j] += a[t] * w[j];
    }
  }
#endif
}

inline void qaxpy(const uint8_t* row, int64_t fmt, const float* a, int64_t t_count, float* y, int64_t h) {
  switch (fmt) {
    case kQ8_0: qaxpy_row<kQ8_0>(row, a, t_count, y, h); break;
    case kQ4_0: qaxpy_row<kQ4_0>(row, a, t_count, y, h); break;
    default: qaxpy_row<kQ4_1>(row, a, t_count, y, h); break;
  }
}

// The selection policy of reference.select_units for one token (threshold, then the min / max
// guards); marks sel[i] = 1 for the chosen units, returns their number. (routed_ffn.cpp has the same
// policy for float units inside its pipelined pass, which this kernel does not share.)
int64_t select_units(const float* score, int64_t f, float threshold, int64_t min_units, int64_t max_units,
                     uint8_t* sel) {
  std::vector<int> idx;
  auto keep_top = [&](int64_t k) {
    std::nth_element(idx.begin(), idx.begin() + k, idx.end(),
                     [score](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
    idx.resize(k);
  };
  for (int64_t i = 0; i < f; ++i)
    if (score[i] >= threshold) idx.push_back(static_cast<int>(i));
  if (static_cast<int64_t>(idx.size()) < min_units) {
    idx.resize(f);
    for (int64_t i = 0; i < f; ++i) idx[i] = static_cast<int>(i);
    keep_top(std::min(min_units, f));
  }
  if (static_cast<int64_t>(idx.size()) > max_units) keep_top(std::max<int64_t>(max_units, 0));
  std::memset(sel, 0, f);
  for (int i : idx) sel[i] = 1;
  return static_cast<int64_t>(idx.size());
}

// y (+)= sum over the units any token selected (sel [T, F]) of a[t] * their down row, with
// act(i, a) giving unit i's coefficients a[T] (0 where a token did not select it). Units are taken
// in ascending order (memory walked forwards); each thread adds into a private [T, H] sum.
template <class Act>
void gather_down(const std::vector<uint8_t>& sel, int64_t t_count, int64_t f, int64_t h, const uint8_t* wd_t,
                 int64_t ldw, int64_t fmt_d, float* y, int accumulate, int nthreads, Act act) {
  std::vector<int> units;
  for (int64_t i = 0; i < f; ++i)
    for (int64_t t = 0; t < t_count; ++t)
      if (sel[t * f + i]) {
        units.push_back(static_cast<int>(i));
        break;
      }
  if (!accumulate) std::fill(y, y + t_count * h, 0.0f);
  const int64_t n = static_cast<int64_t>(units.size());
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> part(t_count * h, 0.0f);
#pragma omp for schedule(dynamic, kChunk) nowait
    for (int64_t j = 0; j < n; ++j) {
      float a[kMaxTokens];
      act(units[j], a);
      qaxpy(wd_t + units[j] * ldw, fmt_d, a, t_count, part.data(), h);
    }
#pragma omp critical
    for (int64_t k = 0; k < t_count * h; ++k) y[k] += part[k];
  }
}

// The router for formats where an int4 shadow of gate/up costs about as much as gate/up themselves
// (q4; q8 at moderate density): gate and up are computed exactly for every unit, scored as the
// shadow's score is defined but on the exact values, log(|silu(g) u| + 1e-20) + bias, selected by
// the same policy, and only the selected units' down rows are read.
void qrouted_exact(const float* x, int64_t t_count, int64_t h, int64_t f, const uint8_t* wg, const uint8_t* wu,
                   const uint8_t* wd_t, int64_t ldw, int64_t fmt, int64_t fmt_d, const float* unit_bias, float threshold,
                   int64_t min_units, int64_t max_units, float* y, int64_t* counts, int accumulate, int nthreads,
                   int64_t* usage) {
  std::vector<float> act(t_count * f), score(t_count * f);  // [T, F]: silu(g) u, and its score
#pragma omp parallel for schedule(dynamic, kChunk) num_threads(nthreads)
  for (int64_t i = 0; i < f; ++i) {
    float g[kMaxTokens], u[kMaxTokens];
    qdot_tokens(wg + i * ldw, fmt, x, h, t_count, g);
    qdot_tokens(wu + i * ldw, fmt, x, h, t_count, u);
    for (int64_t t = 0; t < t_count; ++t) {
      const float a = silu(g[t]) * u[t];
      act[t * f + i] = a;
      score[t * f + i] = std::log(std::fabs(a) + 1e-20f) + unit_bias[i];
    }
  }
  std::vector<uint8_t> sel(t_count * f);
  for (int64_t t = 0; t < t_count; ++t)
    counts[t] = select_units(score.data() + t * f, f, threshold, min_units, max_units, sel.data() + t * f);
  add_usage(sel.data(), t_count, f, usage);
  gather_down(sel, t_count, f, h, wd_t, ldw, fmt_d, y, accumulate, nthreads, [&](int64_t i, float* a) {
    for (int64_t t = 0; t < t_count; ++t) a[t] = sel[t * f + i] ? act[t * f + i] : 0.0f;
  });
}

}  // namespace

extern "C" {

void ar_router_scores(const float* x, int64_t t_count, int64_t h, int64_t f, const uint8_t* shadow_q,
                      const float* shadow_scale, int64_t group_size, const float* unit_bias, float* out,
                      int nthreads);

// Routed SwiGLU FFN with block-quantised units: unit i's gate row, up row (format fmt) and down
// column (row of w_down_t, format fmt_d) are rows of H/32 blocks each, ldw bytes from one unit to
// the next (the three rows side by side when unit-packed: one contiguous read per unit). Scores come
// from the int4 shadow exactly as in ar_routed_ffn, or from exact gate/up when shadow_q is null
// (qrouted_exact); all_units != 0 computes every unit (the dense pass in this layout).
// counts [T]: units per token; usage [F] (null: not counted) gets each token's selection added.
void ar_qrouted_ffn(const float* x, int64_t t_count, int64_t h, int64_t f, const uint8_t* wg, const uint8_t* wu,
                    const uint8_t* wd_t, int64_t ldw, int64_t fmt, int64_t fmt_d, const uint8_t* shadow_q,
                    const float* shadow_scale, int64_t group_size, const float* unit_bias, float threshold, int64_t min_units,
                    int64_t max_units, int all_units, float* y, int64_t* counts, int accumulate, int nthreads,
                    int64_t* usage) {
  std::vector<uint8_t> sel(t_count * f, 1);  // [T, F]
  if (!all_units && shadow_q == nullptr) {  // exact router: every gate/up row, then the chosen down rows
    qrouted_exact(x, t_count, h, f, wg, wu, wd_t, ldw, fmt, fmt_d, unit_bias, threshold, min_units, max_units, y,
                  counts, accumulate, nthreads, usage);
    return;
  }
  if (!all_units) {
    std::vector<float> score(t_count * f);
    ar_router_scores(x, t_count, h, f, shadow_q, shadow_scale, group_size, unit_bias, score.data(), nthreads);
    for (int64_t t = 0; t < t_count; ++t)
      counts[t] = select_units(score.data() + t * f, f, threshold, min_units, max_units, sel.data() + t * f);
    add_usage(sel.data(), t_count, f, usage);
  } else {
    for (int64_t t = 0; t < t_count; ++t) counts[t] = f;
  }
  gather_down(sel, t_count, f, h, wd_t, ldw, fmt_d, y, accumulate, nthreads, [&](int64_t i, float* a) {
    float g[kMaxTokens], u[kMaxTokens];
    qdot_tokens(wg + i * ldw, fmt, x, h, t_count, g);
    qdot_tokens(wu + i * ldw, fmt, x, h, t_count, u);
    for (int64_t t = 0; t < t_count; ++t) a[t] = sel[t * f + i] ? silu(g[t]) * u[t] : 0.0f;
  });
}

}  // extern "C"

// ---- every decoder layer of a decode step in one call, block-quantised projections ---------------
// The sequence of ar_decode_layers (decode_step.cpp) for dense FFNs, with each product an ar_qlinear.
// ArQStep has ArStep's layout (one ctypes structure, adaroute/runtime/fused_cpu.py, describes both).
extern "C" {

void ar_rmsnorm(const float* x, int64_t t_count, int64_t h, const float* w, float eps, float* out);
void ar_attention(const float* qkv, int64_t b_count, int64_t t_count, int64_t n_heads, int64_t n_kv, int64_t d,
                  float* k_cache, float* v_cache, int64_t s_max, int64_t pos, const int64_t* pad, const float* cos_t,
                  const float* sin_t, float* out, int nthreads);

struct ArQLayer {
  const float *attn_norm, *mlp_norm;
  const uint8_t *wq, *wk, *wv, *wo, *w_gate, *w_up, *w_down;  // blocks; w_down [H, F] as stored
  int64_t fq, fk, fv, fo, fg, fu, fd;                           // their formats (Fmt)
  int64_t q_rows, kv_rows, units;                               // Q*D, K*D, F
};

struct ArQStep {
  float* x;
  float *h, *qkv, *attn, *hid;
  int64_t* counts;
  float *k_cache, *v_cache;
  const int64_t* pad;
  const float *cos, *sin;
  int64_t n_layers, b, t, hidden, n_heads, n_kv, head_dim, s_max, pos, nthreads;
  int64_t layer_stride;
  float eps;
};

void ar_qdecode_layers(const ArQLayer* layers, const ArQStep* s) {
  const int64_t n = s->b * s->t, hd = s->hidden;
  const int th = static_cast<int>(s->nthreads);
  for (int64_t i = 0; i < s->n_layers; ++i) {
    const ArQLayer& ly = layers[i];
    ar_rmsnorm(s->x, n, hd, ly.attn_norm, s->eps, s->h);
    const uint8_t* qkv_w[3] = {ly.wq, ly.wk, ly.wv};
    const int64_t qkv_rows[3] = {ly.q_rows, ly.kv_rows, ly.kv_rows}, qkv_f[3] = {ly.fq, ly.fk, ly.fv};
    ar_qlinear(s->h, n, hd, 3, qkv_w, qkv_rows, qkv_f, s->qkv, ly.q_rows + 2 * ly.kv_rows, 0, th);
    ar_attention(s->qkv, s->b, s->t, s->n_heads, s->n_kv, s->head_dim, s->k_cache + i * s->layer_stride,
                 s->v_cache + i * s->layer_stride, s->s_max, s->pos, s->pad, s->cos, s->sin, s->attn, th);
    const uint8_t* o_w[1] = {ly.wo};
    const int64_t o_rows[1] = {hd}, o_f[1] = {ly.fo}, d_f[1] = {ly.fd};
    ar_qlinear(s->attn, n, ly.q_rows, 1, o_w, o_rows, o_f, s->x, hd, 1, th);
    ar_rmsnorm(s->x, n, hd, ly.mlp_norm, s->eps, s->h);
    ar_qgate_up_silu(s->h, n, hd, ly.w_gate, ly.w_up, ly.fg, ly.fu, ly.units, s->hid, th);
    const uint8_t* d_w[1] = {ly.w_down};
    ar_qlinear(s->hid, n, ly.units, 1, d_w, o_rows, d_f, s->x, hd, 1, th);
    std::fill(s->counts + i * n, s->counts + (i + 1) * n, int64_t{-1});
  }
}

}  // extern "C"
