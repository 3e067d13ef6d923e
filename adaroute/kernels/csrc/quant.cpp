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
#include "step.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

enum Fmt : int64_t { kF32 = 0, kQ8_0 = 1, kQ4_0 = 2, kQ4_1 = 3 };
constexpr int64_t kG16 = 16;  // added to a format code: the weight is in the g16 layout (below)
constexpr int kBlock = 32;
constexpr int kLanes = 16;    // rows per g16 group

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

// ---- the g16 layout: 16 rows per group, one vector lane per row ---------------------------------
// quant_reference.pack16 defines it: per group and block, the 16 rows' float16 scales, their float16
// minimums (q4_1 only), then the code bytes of the 16 rows two at a time: bytes 2p and 2p + 1 of
// every row side by side (32 bytes per p; a q4 byte j holds weights j and j + 16). Widened to int16,
// 32 bytes are one word pair per row and lane, so one multiply-add of word pairs (vpdpwssd) does 32
// multiply-adds for 16 rows, and a block's scales are applied once to its integer sums. The row layout
// with float activations spent ~5.5 cycles per block on expansion, per-block scalar work and row
// reductions, compute-bound at ~10 GB/s per core (docs/perf.md, items 17 and 20).
//
// Activations: int16 per block of 32 (xq = round(x / s), s = max|x| / 32767), the same role as
// llama.cpp's int8 but with 256 times finer steps: int8 moved the embedded model's perplexity by
// 0.16 %, int16 does not move it measurably (docs/quantised.md). Integer sums cannot overflow: 32
// products of at most 127 * 32767 per block.

struct QX {                // activations of up to kMaxTokens tokens, quantised per block of 32
  std::vector<int16_t> q;  // [T, K]
  std::vector<float> s;    // [T, nb]: the block's scale
  std::vector<float> sum;  // [T, nb]: s * sum of the block's codes (the q4 minimum term)
};

inline void quantize_x(const float* x, int64_t t_count, int64_t k, QX& qx) {
  const int64_t nb = k / kBlock;
  qx.q.resize(t_count * k);
  qx.s.resize(t_count * nb);
  qx.sum.resize(t_count * nb);
  for (int64_t t = 0; t < t_count; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * k + b * kBlock;
      float amax = 0.0f;
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float s = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      int32_t total = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int16_t v = static_cast<int16_t>(std::nearbyint(xb[j] * inv));
        qx.q[t * k + b * kBlock + j] = v;
        total += v;
      }
      qx.s[t * nb + b] = s;
      qx.sum[t * nb + b] = s * static_cast<float>(total);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

inline __m512i pair(const int16_t* q) {  // two int16 activations broadcast as one int32 per lane
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm512_set1_epi32(v);
}

// out[t * 16 + r] = row r of the group . x[t] for NT tokens. Four integer chains per token.
template <int64_t FMT, int NT>
inline void qdot_group(const uint8_t* grp, const QX& qx, int64_t t0, int64_t k, int64_t nb, float* out) {
  constexpr int64_t J = FMT == kQ8_0 ? 34 : FMT == kQ4_0 ? 18 : 20;
  constexpr int64_t GB = kLanes * J;
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = grp + b * GB;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    __m512i s[4][NT];
    for (int i = 0; i < 4; ++i)
      for (int t = 0; t < NT; ++t) s[i][t] = _mm512_setzero_si512();
    const int16_t* xq = qx.q.data() + t0 * k + b * kBlock;
    if constexpr (FMT == kQ8_0) {
      const uint8_t* c = p + 2 * kLanes;
      for (int pp = 0; pp < kBlock / 2; ++pp) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + pp * 2 * kLanes)));
        for (int t = 0; t < NT; ++t) s[pp & 3][t] = dpwssd(s[pp & 3][t], w, pair(xq + t * k + 2 * pp));
      }
    } else {
      const uint8_t* c = p + (FMT == kQ4_1 ? 4 : 2) * kLanes;
      const __m512i low = _mm512_set1_epi16(0xf);
      for (int pp = 0; pp < kBlock / 4; ++pp) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + pp * 2 * kLanes)));
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_srli_epi16(v, 4);
        for (int t = 0; t < NT; ++t) {
          s[pp & 1][t] = dpwssd(s[pp & 1][t], lo, pair(xq + t * k + 2 * pp));
          s[2 + (pp & 1)][t] = dpwssd(s[2 + (pp & 1)][t], hi, pair(xq + t * k + 16 + 2 * pp));
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      const int64_t tb = (t0 + t) * nb + b;
      const __m512 sum = _mm512_cvtepi32_ps(
          _mm512_add_epi32(_mm512_add_epi32(s[0][t], s[1][t]), _mm512_add_epi32(s[2][t], s[3][t])));
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(qx.s[tb])), sum, acc[t]);
      if constexpr (FMT == kQ4_1) {
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * kLanes)));
        acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(qx.sum[tb]), acc[t]);
      } else if constexpr (FMT == kQ4_0) {  // w = d (n - 8)
        acc[t] = _mm512_fmadd_ps(d, _mm512_set1_ps(-8.0f * qx.sum[tb]), acc[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * kLanes, acc[t]);
}
#else
template <int64_t FMT, int NT>
inline void qdot_group(const uint8_t* grp, const QX& qx, int64_t t0, int64_t k, int64_t nb, float* out) {
  constexpr int64_t J = FMT == kQ8_0 ? 34 : FMT == kQ4_0 ? 18 : 20;
  constexpr int64_t GB = kLanes * J;
  float acc[NT][kLanes] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = grp + b * GB;
    const uint8_t* c = p + (FMT == kQ4_1 ? 4 : 2) * kLanes;
    for (int r = 0; r < kLanes; ++r) {
      const float d = half_to_float(p + 2 * r);
      for (int t = 0; t < NT; ++t) {
        const int16_t* xq = qx.q.data() + (t0 + t) * k + b * kBlock;
        const int64_t tb = (t0 + t) * nb + b;
        int32_t s = 0;
        for (int j = 0; j < (FMT == kQ8_0 ? kBlock : kBlock / 2); ++j) {
          const uint8_t q = c[(j / 2 * kLanes + r) * 2 + j % 2];
          if constexpr (FMT == kQ8_0)
            s += static_cast<int8_t>(q) * xq[j];
          else
            s += (q & 0xf) * xq[j] + (q >> 4) * xq[j + 16];
        }
        acc[t][r] += d * qx.s[tb] * static_cast<float>(s);
        if constexpr (FMT == kQ4_1) acc[t][r] += half_to_float(p + 2 * kLanes + 2 * r) * qx.sum[tb];
        if constexpr (FMT == kQ4_0) acc[t][r] += d * (-8.0f * qx.sum[tb]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < kLanes; ++r) out[t * kLanes + r] = acc[t][r];
}
#endif

template <int64_t FMT>
inline void qdot_group_fmt(const uint8_t* grp, const QX& qx, int64_t k, int64_t t_count, float* out) {
  const int64_t nb = k / kBlock;
  for (int64_t t0 = 0; t0 < t_count; t0 += kTokBlock) {
    float* o = out + t0 * kLanes;
    switch (std::min<int64_t>(kTokBlock, t_count - t0)) {
      case 4: qdot_group<FMT, 4>(grp, qx, t0, k, nb, o); break;
      case 3: qdot_group<FMT, 3>(grp, qx, t0, k, nb, o); break;
      case 2: qdot_group<FMT, 2>(grp, qx, t0, k, nb, o); break;
      default: qdot_group<FMT, 1>(grp, qx, t0, k, nb, o); break;
    }
  }
}

// out[t * 16 + r] = row r of group . x[t] for every token (fmt without the kG16 flag).
inline void qdot_group_tokens(const uint8_t* grp, int64_t fmt, const QX& qx, int64_t k, int64_t t_count, float* out) {
  switch (fmt) {
    case kQ8_0: qdot_group_fmt<kQ8_0>(grp, qx, k, t_count, out); break;
    case kQ4_0: qdot_group_fmt<kQ4_0>(grp, qx, k, t_count, out); break;
    default: qdot_group_fmt<kQ4_1>(grp, qx, k, t_count, out); break;
  }
}

// Gate and up of f units in the g16 layout (formats without the kG16 flag), a group of 16 units at a
// time in equal static shares per thread: fn(g, gv, uv) gets group g's products, [T, 16] each. qx is
// left holding the rounded activations.
template <class Fn>
void gate_up_groups(const float* x, int64_t t_count, int64_t k, const uint8_t* wg, const uint8_t* wu, int64_t fmt_g,
                    int64_t fmt_u, int64_t f, int nthreads, QX& qx, Fn fn) {
  const int64_t nb = k / kBlock, groups = (f + kLanes - 1) / kLanes;
  const int64_t sg = kLanes * nb * block_bytes(fmt_g), su = kLanes * nb * block_bytes(fmt_u);
  quantize_x(x, t_count, k, qx);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t g = 0; g < groups; ++g) {
    alignas(64) float gv[kMaxTokens * kLanes], uv[kMaxTokens * kLanes];
    qdot_group_tokens(wg + g * sg, fmt_g, qx, k, t_count, gv);
    qdot_group_tokens(wu + g * su, fmt_u, qx, k, t_count, uv);
    fn(g, gv, uv);
  }
}

}  // namespace

extern "C" {

// y[t, col0(s) + m] (+)= ws[s][m] . x[t] for every segment s (segments side by side in y, as ar_linear).
// A format code with kG16 added: the weight is in the g16 layout (rows in groups of 16, the last
// group padded), else in GGUF's row layout.
void ar_qlinear(const float* x, int64_t t_count, int64_t k, int nseg, const uint8_t* const* ws, const int64_t* rows,
                const int64_t* fmts, float* y, int64_t ldy, int accumulate, int nthreads) {
  const int64_t nb = k / kBlock;
  QX qx;
  quantize_x(x, t_count, k, qx);
#pragma omp parallel num_threads(nthreads)
  {
    int64_t col0 = 0;
    for (int s = 0; s < nseg; ++s) {
      const int64_t m = rows[s], fmt = fmts[s] & ~kG16;
      const int64_t stride = nb * block_bytes(fmt);
      if (fmts[s] & kG16) {
        const int64_t groups = (m + kLanes - 1) / kLanes;
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < groups; ++g) {
          alignas(64) float out[kMaxTokens * kLanes];
          qdot_group_tokens(ws[s] + g * kLanes * stride, fmt, qx, k, t_count, out);
          const int64_t r0 = g * kLanes, n = std::min<int64_t>(kLanes, m - r0);
          for (int64_t t = 0; t < t_count; ++t) {
            float* dst = y + t * ldy + col0 + r0;
            for (int64_t r = 0; r < n; ++r) dst[r] = accumulate ? dst[r] + out[t * kLanes + r] : out[t * kLanes + r];
          }
        }
      } else {
#pragma omp for schedule(dynamic, kChunk) nowait
        for (int64_t r = 0; r < m; ++r) {
          float out[kMaxTokens];
          qdot_tokens(ws[s] + r * stride, fmt, x, k, t_count, out);
          for (int64_t t = 0; t < t_count; ++t) {
            float* dst = y + t * ldy + col0 + r;
            *dst = accumulate ? *dst + out[t] : out[t];
          }
        }
      }
      col0 += m;
    }
  }
}

// h[t, i] = silu(w_gate[i] . x[t]) * (w_up[i] . x[t]) with block-quantised gate and up.
// (Both in the g16 layout, or both in rows.)
void ar_qgate_up_silu(const float* x, int64_t t_count, int64_t k, const uint8_t* wg, const uint8_t* wu, int64_t fmt_g,
                      int64_t fmt_u, int64_t f, float* h, int nthreads) {
  if (fmt_g & fmt_u & kG16) {
    QX qx;
    gate_up_groups(x, t_count, k, wg, wu, fmt_g & ~kG16, fmt_u & ~kG16, f, nthreads, qx,
                   [&](int64_t g, const float* gv, const float* uv) {
                     const int64_t r0 = g * kLanes, n = std::min<int64_t>(kLanes, f - r0);
                     for (int64_t t = 0; t < t_count; ++t)
                       for (int64_t r = 0; r < n; ++r)
                         h[t * f + r0 + r] = silu(gv[t * kLanes + r]) * uv[t * kLanes + r];
                   });
    return;
  }
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

constexpr int64_t kGatherAhead = 6;  // selected units ahead whose down rows the gather prefetches

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
// guards) over scores, or over any increasing function of them with the threshold mapped alike (the
// exact router passes exp(score)); marks sel[i] = 1 for the chosen units, returns their number. (routed_ffn.cpp has the same
// policy for float units inside its pipelined pass, which this kernel does not share.)
int64_t select_units(const float* score, int64_t f, float threshold, int64_t min_units, int64_t max_units,
                     uint8_t* sel) {
  int64_t passed = 0;  // the threshold test alone, branch-free (vectorised); the guards need the order
  for (int64_t i = 0; i < f; ++i) {
    sel[i] = score[i] >= threshold;
    passed += sel[i];
  }
  if (passed >= min_units && passed <= max_units) return passed;
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

// Per-thread partial sums made deterministic: every thread runs body(part) on its own zeroed vector
// of `size` floats (the body takes its share with an `omp for schedule(static)`), and the parts are
// added in thread order, so the result does not depend on timing.
template <class Body>
std::vector<float> ordered_sum(int nthreads, int64_t size, Body body) {
  std::vector<std::vector<float>> parts(std::max(nthreads, 1));
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float>& part = parts[omp_get_thread_num()];
    part.assign(size, 0.0f);
    body(part.data());
  }
  std::vector<float> sum(size, 0.0f);
  for (const auto& part : parts)
    for (int64_t k = 0; k < static_cast<int64_t>(part.size()); ++k) sum[k] += part[k];
  return sum;
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
  const int64_t row_bytes = h / kBlock * block_bytes(fmt_d);
  const std::vector<float> sum = ordered_sum(nthreads, t_count * h, [&](float* part) {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
#ifdef __AVX512F__
      // The rows of units kGatherAhead selections on, into L2: selected rows are scattered (a gap
      // wherever a unit was skipped), which the hardware prefetcher does not follow, so without this
      // every row waited on memory (measured in the decode step: ~90 ns per unit at q8_0, 7 GB/s).
      if (j + kGatherAhead < n)
        for (int64_t b = 0; b < row_bytes; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(wd_t + units[j + kGatherAhead] * ldw + b), _MM_HINT_T1);
#endif
      float a[kMaxTokens];
      act(units[j], a);
      qaxpy(wd_t + units[j] * ldw, fmt_d, a, t_count, part, h);
    }
  });
  for (int64_t k = 0; k < t_count * h; ++k) y[k] += sum[k];
}

// The router for formats where an int4 shadow of gate/up costs about as much as gate/up themselves
// (q4; q8 at moderate density): gate and up are computed exactly for every unit, scored as the
// shadow's score is defined but on the exact values, log(|silu(g) u| + 1e-20) + bias, selected by
// the same policy. The down projection: with fmt_d in the g16 layout (kG16), w_down [H, F] itself
// times the activations with the unselected units' set to 0, by the dense g16 kernel; else only the
// selected units' down rows (w_down_t [F, H] rows, ldw apart). The dense product is what the runtime
// uses: rows of 340-612 bytes gathered with gaps cost as much as reading every row (the hardware
// prefetcher pulls the skipped rows in; measured: a random half or a quarter of the units' rows
// took as long as all of them, a contiguous half half as long; docs/perf.md, item 22).
// The routing adapter of a routed FFN (rank 0: none), as reference.Adapter: a_in [2r, H], a_units
// [F, 3, r] (B_g row, B_u row, A_d column of unit i), a_out [H, r], all float16 (the runtime holds a
// quantised model's adapters at half the bytes: at float32 they were ~10 % of a q4 model's bytes per
// token, read for every token). Applied to the selected units only.
struct QAdapter {
  int64_t rank = 0;
  const uint16_t *a_in = nullptr, *a_units = nullptr, *a_out = nullptr;
};

// sum_k half(a[k]) * b[k] over n values (whole vectors when n is a multiple of 16: the default ranks
// and every hidden size here; a scalar float sum is not reordered by the compiler).
inline float dot_half(const uint16_t* a, const float* b, int64_t n) {
#ifdef __AVX512F__
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16)
      acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k))),
                            _mm512_loadu_ps(b + k), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.0f;
  for (int64_t k = 0; k < n; ++k) s += half_to_float(reinterpret_cast<const uint8_t*>(a + k)) * b[k];
  return s;
}

// y[k] += c * half(a[k]) for k < n.
inline void axpy_half(float c, const uint16_t* a, float* y, int64_t n) {
#ifdef __AVX512F__
  if (n % 16 == 0) {
    const __m512 cv = _mm512_set1_ps(c);
    for (int64_t k = 0; k < n; k += 16)
      _mm512_storeu_ps(y + k, _mm512_fmadd_ps(cv, _mm512_cvtph_ps(_mm256_loadu_si256(
                                                     reinterpret_cast<const __m256i*>(a + k))), _mm512_loadu_ps(y + k)));
    return;
  }
#endif
  for (int64_t k = 0; k < n; ++k) y[k] += c * half_to_float(reinterpret_cast<const uint8_t*>(a + k));
}

void qrouted_exact(const float* x, int64_t t_count, int64_t h, int64_t f, const uint8_t* wg, const uint8_t* wu,
                   const uint8_t* wd_t, int64_t ldw, int64_t fmt, int64_t fmt_d, const float* unit_bias, float threshold,
                   int64_t min_units, int64_t max_units, int all_units, float* y, int64_t* counts, int accumulate,
                   int nthreads, int64_t* usage, const QAdapter& ad) {
  const int64_t r = all_units ? 0 : ad.rank;  // the dense pass is the base FFN: no adapter
  // [T, F]: the base activation silu(g) u and its selection key; with an adapter also g and u.
  // The key is exp(score) = (|a| + 1e-20) * exp(bias), compared with exp(threshold): the same order
  // and the same threshold test as the score log(|a| + 1e-20) + bias, without a logarithm per unit.
  std::vector<float> act(t_count * f), key(all_units ? 0 : t_count * f), gate(r ? t_count * f : 0),
      up(r ? t_count * f : 0);
  auto keep = [&](int64_t i, const float* g, const float* u, int64_t stride) {
    const float eb = all_units ? 0.0f : std::exp(unit_bias[i]);
    for (int64_t t = 0; t < t_count; ++t) {
      const float gt = g[t * stride], ut = u[t * stride], a = silu(gt) * ut;
      act[t * f + i] = a;
      if (!all_units) key[t * f + i] = (std::fabs(a) + 1e-20f) * eb;
      if (r) gate[t * f + i] = gt, up[t * f + i] = ut;
    }
  };
  std::vector<float> xr;  // the activations the products saw (int16-rounded for g16): the adapter's input
  if (fmt & kG16) {  // gate and up in the g16 layout: 16 units per group, as ar_qgate_up_silu
    const int64_t fm = fmt & ~kG16, nb = h / kBlock;
    QX qx;
    gate_up_groups(x, t_count, h, wg, wu, fm, fm, f, nthreads, qx, [&](int64_t g, const float* gv, const float* uv) {
      const int64_t i0 = g * kLanes;
#ifdef __AVX512F__
      if (i0 + kLanes <= f) {  // 16 units at once (silu and exp on vectors)
        const __m512 one = _mm512_set1_ps(1.0f), tiny = _mm512_set1_ps(1e-20f);
        const __m512 eb = all_units ? _mm512_setzero_ps() : vexp(_mm512_loadu_ps(unit_bias + i0));
        for (int64_t t = 0; t < t_count; ++t) {
          const __m512 gt = _mm512_load_ps(gv + t * kLanes), ut = _mm512_load_ps(uv + t * kLanes);
          const __m512 a = _mm512_mul_ps(_mm512_div_ps(gt, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), gt)))), ut);
          _mm512_storeu_ps(act.data() + t * f + i0, a);
          if (!all_units) _mm512_storeu_ps(key.data() + t * f + i0, _mm512_mul_ps(_mm512_add_ps(_mm512_abs_ps(a), tiny), eb));
          if (r) _mm512_storeu_ps(gate.data() + t * f + i0, gt), _mm512_storeu_ps(up.data() + t * f + i0, ut);
        }
        return;
      }
#endif
      for (int64_t lane = 0; lane < kLanes && i0 + lane < f; ++lane) keep(i0 + lane, gv + lane, uv + lane, kLanes);
    });
    if (r) {
      xr.resize(t_count * h);
      for (int64_t t = 0; t < t_count; ++t)
        for (int64_t k = 0; k < h; ++k) xr[t * h + k] = qx.s[t * nb + k / kBlock] * qx.q[t * h + k];
    }
  } else {
#pragma omp parallel for schedule(dynamic, kChunk) num_threads(nthreads)
    for (int64_t i = 0; i < f; ++i) {
      float g[kMaxTokens], u[kMaxTokens];
      qdot_tokens(wg + i * ldw, fmt, x, h, t_count, g);
      qdot_tokens(wu + i * ldw, fmt, x, h, t_count, u);
      keep(i, g, u, 1);
    }
  }
  std::vector<uint8_t> sel(t_count * f, 1);
  if (all_units) {
    for (int64_t t = 0; t < t_count; ++t) counts[t] = f;
  } else {
    const float key_threshold = std::exp(threshold);  // -inf: 0, every key passes; +inf: none does
    for (int64_t t = 0; t < t_count; ++t)
      counts[t] = select_units(key.data() + t * f, f, key_threshold, min_units, max_units, sel.data() + t * f);
    add_usage(sel.data(), t_count, f, usage);
  }
  std::vector<float> z(t_count * 2 * r);  // [T, 2r]: x A^T (A_g then A_u)
  const float* xa = xr.empty() ? x : xr.data();
  // The adapter's two projections are small (2r x H and H x r): one thread each, vectorised; a
  // parallel region apiece cost more in fork and join than it saved (docs/perf.md, item 22).
  for (int64_t k = 0; k < 2 * r; ++k)  // z[t, k] = a_in[k] . x[t]
    for (int64_t t = 0; t < t_count; ++t) z[t * 2 * r + k] = dot_half(ad.a_in + k * h, xa + t * h, h);
  if (!r) {  // the base activations of the selected units, the rest 0
    for (int64_t k = 0; k < t_count * f; ++k) act[k] = sel[k] ? act[k] : 0.0f;
  }
  // The selected units' adapted activations (the rest: 0) and the down adapter's input sum a_i A_d[i]
  // per token [T, r], each thread over a fixed share of the units (ordered_sum).
  const std::vector<float> zsum = !r ? std::vector<float>() : ordered_sum(nthreads, t_count * r, [&](float* zpart) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < f; ++i) {
#ifdef __AVX512F__
      if (r && i + 16 < f)  // the adapter rows of units a few places on: scattered reads the prefetcher misses
        for (int64_t b = 0; b < 3 * r * 2; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(ad.a_units + (i + 16) * 3 * r) + b, _MM_HINT_T0);
#endif
      for (int64_t t = 0; t < t_count; ++t) {
        float& a = act[t * f + i];
        if (!sel[t * f + i]) {
          a = 0.0f;
          continue;
        }
        const uint16_t* au = ad.a_units + i * 3 * r;  // B_g row, B_u row, A_d column of unit i
        const float* zt = z.data() + t * 2 * r;
        a = silu(gate[t * f + i] + dot_half(au, zt, r)) * (up[t * f + i] + dot_half(au + r, zt + r, r));
        axpy_half(a, au + 2 * r, zpart + t * r, r);
      }
    }
  });
  if (fmt_d & kG16) {  // the down projection [H, F] itself: every row, the unselected units' activations 0
    const int64_t rows[1] = {h}, fmts[1] = {fmt_d};
    const uint8_t* ws[1] = {wd_t};
    ar_qlinear(act.data(), t_count, f, 1, ws, rows, fmts, y, h, accumulate, nthreads);
  } else {
    gather_down(sel, t_count, f, h, wd_t, ldw, fmt_d, y, accumulate, nthreads, [&](int64_t i, float* a) {
      for (int64_t t = 0; t < t_count; ++t) a[t] = act[t * f + i];
    });
  }
  if (!r) return;
  for (int64_t k = 0; k < h; ++k)  // the down adapter's output projection: a_out . zsum[t]
    for (int64_t t = 0; t < t_count; ++t) y[t * h + k] += dot_half(ad.a_out + k * r, zsum.data() + t * r, r);
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
// (qrouted_exact); all_units != 0 computes every unit (the dense pass in this layout). fmt with kG16
// added: gate and up are separate matrices in the g16 layout (exact router only), ldw the down rows' stride.
// counts [T]: units per token; usage [F] (null: not counted) gets each token's selection added.
// adapter_rank > 0: the routing adapter (QAdapter, float16) corrects the selected units; exact router only.
void ar_qrouted_ffn(const float* x, int64_t t_count, int64_t h, int64_t f, const uint8_t* wg, const uint8_t* wu,
                    const uint8_t* wd_t, int64_t ldw, int64_t fmt, int64_t fmt_d, const uint8_t* shadow_q,
                    const float* shadow_scale, int64_t group_size, const float* unit_bias, float threshold, int64_t min_units,
                    int64_t max_units, int all_units, float* y, int64_t* counts, int accumulate, int nthreads,
                    int64_t* usage, int64_t adapter_rank, const uint16_t* a_in, const uint16_t* a_units,
                    const uint16_t* a_out) {
  std::vector<uint8_t> sel(t_count * f, 1);  // [T, F]
  if ((!all_units && shadow_q == nullptr) || (fmt & kG16)) {  // exact router: all gate/up, the chosen down rows
    QAdapter ad;
    ad.rank = adapter_rank, ad.a_in = a_in, ad.a_units = a_units, ad.a_out = a_out;
    qrouted_exact(x, t_count, h, f, wg, wu, wd_t, ldw, fmt, fmt_d, unit_bias, threshold, min_units, max_units,
                  all_units, y, counts, accumulate, nthreads, usage, ad);
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
// The sequence of ar_decode_layers (decode_step.cpp) with each product a block-quantised one: dense
// FFNs as GGUF stores them, routed FFNs through ar_qrouted_ffn (sparse with the fail-safe of step.h,
// or every unit above the layer's sparse limit). ArQLayer is mirrored in adaroute/runtime/quant_step.py.
extern "C" {

void ar_rmsnorm(const float* x, int64_t t_count, int64_t h, const float* w, float eps, float* out);
void ar_attention(const float* qkv, int64_t b_count, int64_t t_count, int64_t n_heads, int64_t n_kv, int64_t d,
                  float* k_cache, float* v_cache, int64_t s_max, int64_t pos, const int64_t* pad, const float* cos_t,
                  const float* sin_t, float* out, int nthreads);

struct ArQLayer {
  const float *attn_norm, *mlp_norm;
  const uint8_t *wq, *wk, *wv, *wo, *w_gate, *w_up, *w_down;  // blocks; w_down: [H, F] dense, [F, H] rows routed
  int64_t fq, fk, fv, fo, fg, fu, fd;                           // their format codes (Fmt, + kG16)
  int64_t q_rows, kv_rows, units;                               // Q*D, K*D, F
  // routed FFNs (kind 1), as ArLayer: the unit rows ldw bytes apart (w_gate/w_up/w_down), the router
  const uint8_t* shadow_q;                                      // null: the exact router
  const float *shadow_scale, *unit_bias;
  int64_t ldw, group_size, kind, min_units, max_units, sparse_max_tokens;
  float threshold;
  int64_t band_lo, band_hi, fault;
  const uint16_t *a_in, *a_units, *a_out;  // routing adapter, float16 (exact router, sparse path only)
  int64_t adapter_rank;                 // 0: no adapter
};

void ar_qdecode_layers(const ArQLayer* layers, const ArStep* s) {
  const int64_t n = s->b * s->t, hd = s->hidden;
  const int th = static_cast<int>(s->nthreads);
  for (int64_t i = 0; i < s->n_layers; ++i) {
    const ArQLayer& ly = layers[i];
    int64_t* counts = s->counts + i * n;
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
    std::fill(counts, counts + n, int64_t{-1});
    if (ly.kind == 0) {
      ar_qgate_up_silu(s->h, n, hd, ly.w_gate, ly.w_up, ly.fg, ly.fu, ly.units, s->hid, th);
      const uint8_t* d_w[1] = {ly.w_down};
      ar_qlinear(s->hid, n, ly.units, 1, d_w, o_rows, d_f, s->x, hd, 1, th);
      continue;
    }
    auto run = [&](int all_units, float* y, int64_t* c, int accumulate, int64_t* usage) {
      ar_qrouted_ffn(s->h, n, hd, ly.units, ly.w_gate, ly.w_up, ly.w_down, ly.ldw, ly.fg, ly.fd, ly.shadow_q,
                     ly.shadow_scale, ly.group_size, ly.unit_bias, ly.threshold, ly.min_units, ly.max_units, all_units,
                     y, c, accumulate, th, usage, all_units ? 0 : ly.adapter_rank, ly.a_in, ly.a_units, ly.a_out);
    };
    const bool every_unit = std::isinf(ly.threshold) && ly.threshold < 0 && ly.max_units >= ly.units;
    const bool sparse = n <= ly.sparse_max_tokens && !every_unit;
    if (sparse && s->failsafe) {
      routed_failsafe(s, i, ly.units, ly.band_lo, ly.band_hi, ly.fault, counts,
                      [&](float* out, int64_t* c, int64_t* usage) { run(0, out, c, 0, usage); },
                      [&](float* out, int64_t* c) { run(1, out, c, 0, nullptr); });
      continue;
    }
    run(sparse ? 0 : 1, s->x, counts, 1, sparse ? usage_row(s, ly.units, i) : nullptr);
    if (!sparse) std::fill(counts, counts + n, int64_t{-1});
  }
}

}  // extern "C"
