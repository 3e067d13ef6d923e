// Block-quantised decode kernels: int8 activations x GGUF blocks (q8_0, q4_0, q4_1), read in place.
//
// Shape letters:
//   T  tokens in flight   K  input length (multiple of 32)   M  output rows   B = K / 32 blocks per row
//
// The product is defined in adaroute/kernels/quant_reference.py: x is quantised per token and block
// of 32 to int8 (sx = max|x| / 127, xq = round-half-even(x / sx)), each block's code dot product is
// an exact integer, and only the per-block scaling is floating point. Weights stay in the file's
// array-of-blocks layout (a row of blocks per output row), so a row is one sequential stream.
// Integer dots: AVX-512 VNNI (256-bit lanes, vpdpbusd) or AVX-VNNI where present, AVX2 maddubs+madd
// otherwise, a scalar loop without AVX2. vpdpbusd multiplies unsigned by signed bytes: q4 nibbles
// are unsigned already (q4_0's -8 is folded into the minimum term: sum (n-8) xq = sum n xq - 8 sum xq);
// q8 codes go in as |q| with the sign moved onto xq.
#include "common.h"

#if defined(__AVX2__)
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

// int8 activations of T tokens: xq [T, K], sx [T, B], xs [T, B] = sx * sum of the block's codes.
struct QAct {
  std::vector<int8_t> q;
  std::vector<float> s, xs;
  int64_t k = 0;
};

void quantize_act(const float* x, int64_t t_count, int64_t k, int64_t ldx, QAct& a) {
  const int64_t nb = k / kBlock;
  a.q.resize(t_count * k);
  a.s.resize(t_count * nb);
  a.xs.resize(t_count * nb);
  a.k = k;
  for (int64_t t = 0; t < t_count; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * ldx + b * kBlock;
      float amax = 0.0f;
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float scale = amax / 127.0f;
      const float safe = scale > 0.0f ? scale : 1.0f;
      int8_t* qb = a.q.data() + t * k + b * kBlock;
      int sum = 0;
      for (int j = 0; j < kBlock; ++j) {  // x / scale, rounded half to even as torch.round
        const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(xb[j] / safe)));
        qb[j] = static_cast<int8_t>(v);
        sum += qb[j];
      }
      a.s[t * nb + b] = scale;
      a.xs[t * nb + b] = scale * static_cast<float>(sum);
    }
}

#if defined(__AVX2__)
// 8 int32 lanes of sum u[j] * s[j] (u unsigned bytes, s signed bytes).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else  // pairs of u8*s8 fit int16 (2 * 128 * 127 < 2^15)
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 codes of a q4 block as unsigned bytes, element order (low nibbles 0-15, high 16-31).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}
#endif

// dot of one row of blocks with one token's int8 activations (the reference's y[t, r]).
template <int64_t FMT>
inline float qdot_row(const uint8_t* row, const int8_t* xq, const float* sx, const float* xs, int64_t nb) {
  constexpr int64_t J = FMT == kQ8_0 ? 34 : FMT == kQ4_0 ? 18 : 20;
  float minimum = 0.0f;  // q4: sum_b m_b * xs_b (q4_0: m_b = -8 d_b)
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  auto one = [&](int64_t bb, __m256& acc) {
    const uint8_t* blk = row + bb * J;
    const float d = half_to_float(blk);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + bb * kBlock));
    __m256i dot;
    if constexpr (FMT == kQ8_0) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      dot = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    } else if constexpr (FMT == kQ4_0) {
      dot = dot_u8s8(nibbles(blk + 2), xv);
      minimum -= 8.0f * d * xs[bb];
    } else {
      dot = dot_u8s8(nibbles(blk + 4), xv);
      minimum += half_to_float(blk + 2) * xs[bb];
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * sx[bb]), acc);
  };
  for (; b + 2 <= nb; b += 2) {
    one(b, acc0);
    one(b + 1, acc1);
  }
  if (b < nb) one(b, acc0);
  return hsum8(_mm256_add_ps(acc0, acc1)) + minimum;
#else
  float total = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * J;
    const float d = half_to_float(blk);
    const int8_t* xb = xq + b * kBlock;
    int dot = 0;
    if constexpr (FMT == kQ8_0) {
      const int8_t* w = reinterpret_cast<const int8_t*>(blk + 2);
      for (int j = 0; j < kBlock; ++j) dot += w[j] * xb[j];
    } else {
      const uint8_t* p = blk + (FMT == kQ4_1 ? 4 : 2);
      for (int j = 0; j < 16; ++j) dot += (p[j] & 0xf) * xb[j] + (p[j] >> 4) * xb[j + 16];
      minimum += FMT == kQ4_1 ? half_to_float(blk + 2) * xs[b] : -8.0f * d * xs[b];
    }
    total += d * sx[b] * static_cast<float>(dot);
  }
  return total + minimum;
#endif
}

// out[t] = row . x[t] for every token, dispatching on the format once per row.
inline void qdot_tokens(const uint8_t* row, int64_t fmt, const QAct& a, int64_t t_count, float* out) {
  const int64_t nb = a.k / kBlock;
  for (int64_t t = 0; t < t_count; ++t) {
    const int8_t* xq = a.q.data() + t * a.k;
    const float *sx = a.s.data() + t * nb, *xs = a.xs.data() + t * nb;
    switch (fmt) {
      case kQ8_0: out[t] = qdot_row<kQ8_0>(row, xq, sx, xs, nb); break;
      case kQ4_0: out[t] = qdot_row<kQ4_0>(row, xq, sx, xs, nb); break;
      default: out[t] = qdot_row<kQ4_1>(row, xq, sx, xs, nb); break;
    }
  }
}

QAct& scratch() {
  static thread_local QAct a;  // the calling thread's; the team reads it inside the parallel region
  return a;
}

}  // namespace

extern "C" {

// y[t, col0(s) + m] (+)= ws[s][m] . x[t] for every segment s (segments side by side in y, as ar_linear).
void ar_qlinear(const float* x, int64_t t_count, int64_t k, int nseg, const uint8_t* const* ws, const int64_t* rows,
                const int64_t* fmts, float* y, int64_t ldy, int accumulate, int nthreads) {
  QAct& a = scratch();
  quantize_act(x, t_count, k, k, a);
  const int64_t nb = k / kBlock;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t col0 = 0;
    for (int s = 0; s < nseg; ++s) {
      const int64_t m = rows[s], stride = nb * block_bytes(fmts[s]);
#pragma omp for schedule(dynamic, kChunk) nowait
      for (int64_t r = 0; r < m; ++r) {
        float out[kMaxTokens];
        qdot_tokens(ws[s] + r * stride, fmts[s], a, t_count, out);
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
  QAct& a = scratch();
  quantize_act(x, t_count, k, k, a);
  const int64_t nb = k / kBlock, sg = nb * block_bytes(fmt_g), su = nb * block_bytes(fmt_u);
#pragma omp parallel for schedule(dynamic, kChunk) num_threads(nthreads)
  for (int64_t i = 0; i < f; ++i) {
    float g[kMaxTokens], u[kMaxTokens];
    qdot_tokens(wg + i * sg, fmt_g, a, t_count, g);
    qdot_tokens(wu + i * su, fmt_u, a, t_count, u);
    for (int64_t t = 0; t < t_count; ++t) h[t * f + i] = silu(g[t]) * u[t];
  }
}

}  // extern "C"
