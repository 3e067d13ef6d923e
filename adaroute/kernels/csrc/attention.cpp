// Grouped-query attention for decode, with RoPE and the KV-cache write fused in.
//   B  sequences   Q  query heads   K  key/value heads   S  cache slots   D  head dim
#include "common.h"

namespace {

// Rotary embedding of one head vector, the half-rotation form: out = x * cos + rotate_half(x) * sin.
inline void rope_row(const float* x, const float* c, const float* s, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] - x[i + half] * s[i];
    out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

constexpr int64_t kMaxVecDim = 256;  // head dims up to this (multiples of 16) take the vector path

// Softmax-weighted sum of cached values for one query: out = sum_j softmax(q . k_j * scale) v_j, j in [lo, hi].
// p holds at least hi + 1 floats of scratch.
void attend_one(const float* q, const float* kc, const float* vc, int64_t lo, int64_t hi, int64_t d, float scale,
                float* p, float* out) {
#ifdef __AVX512F__
  // The cache rows are read once per query head either way; what costs is per-key work: a libm exp
  // and a scalar reduction per key made this ~5x slower than its memory traffic at a 200-token context.
  if (d % 16 == 0 && d <= kMaxVecDim) {
    const int64_t nv = d / 16;
    __m512 qv[kMaxVecDim / 16], acc[kMaxVecDim / 16];
    for (int64_t c = 0; c < nv; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
    float m = -INFINITY;
    for (int64_t j = lo; j <= hi; ++j) {
      const float* kj = kc + j * d;
      __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj)), a1 = _mm512_setzero_ps();
      for (int64_t c = 1; c + 1 < nv; c += 2) {
        a1 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kj + 16 * c), a1);
        a0 = _mm512_fmadd_ps(qv[c + 1], _mm512_loadu_ps(kj + 16 * c + 16), a0);
      }
      if (nv % 2 == 0) a1 = _mm512_fmadd_ps(qv[nv - 1], _mm512_loadu_ps(kj + 16 * (nv - 1)), a1);
      p[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      m = std::max(m, p[j]);
    }
    __m512 sumv = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t j = lo; j <= hi; j += 16) {
      const __mmask16 k = hi + 1 - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (hi + 1 - j)) - 1u);
      const __m512 e = vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), mv));
      _mm512_mask_storeu_ps(p + j, k, e);
      sumv = _mm512_add_ps(sumv, _mm512_maskz_mov_ps(k, e));
    }
    for (int64_t c = 0; c < nv; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t j = lo; j <= hi; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      const float* vj = vc + j * d;
      for (int64_t c = 0; c < nv; ++c) acc[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16 * c), acc[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sumv));
    for (int64_t c = 0; c < nv; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
    return;
  }
#endif
  float m = -INFINITY;
  for (int64_t j = lo; j <= hi; ++j) {
    p[j] = dot(q, kc + j * d, d) * scale;
    m = std::max(m, p[j]);
  }
  float sum = 0.0f;
  for (int64_t j = lo; j <= hi; ++j) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  std::fill(out, out + d, 0.0f);
  for (int64_t j = lo; j <= hi; ++j) {
    const float* vj = vc + j * d;
    const float pj = p[j];
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] += pj * vj[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}
}  // namespace

extern "C" {

// Grouped-query attention for t_count new tokens of each of b_count left-padded sequences.
// qkv [B*T, (Q + 2K) * D]; caches [B, K, S, D] for this layer; cos/sin tables [positions, D].
// New keys (after RoPE) and values go to slots pos .. pos+T-1; token t of sequence b sits at RoPE
// position pos + t - pad[b] and attends slots pad[b] .. pos + t (a padding token attends only itself).
void ar_attention(const float* qkv, int64_t b_count, int64_t t_count, int64_t n_heads, int64_t n_kv, int64_t d,
                  float* k_cache, float* v_cache, int64_t s_max, int64_t pos, const int64_t* pad,
                  const float* cos_t, const float* sin_t, float* out, int nthreads) {
  const int64_t width = (n_heads + 2 * n_kv) * d, group = n_heads / n_kv;
  std::vector<float> q(static_cast<size_t>(b_count * t_count * n_heads * d));
  for (int64_t b = 0; b < b_count; ++b)
    for (int64_t t = 0; t < t_count; ++t) {
      const int64_t n = b * t_count + t, slot = pos + t, p = std::max<int64_t>(slot - pad[b], 0);
      const float* row = qkv + n * width;
      for (int64_t h = 0; h < n_heads; ++h) rope_row(row + h * d, cos_t + p * d, sin_t + p * d, d, &q[(n * n_heads + h) * d]);
      for (int64_t g = 0; g < n_kv; ++g) {
        const int64_t at = ((b * n_kv + g) * s_max + slot) * d;
        rope_row(row + (n_heads + g) * d, cos_t + p * d, sin_t + p * d, d, k_cache + at);
        std::memcpy(v_cache + at, row + (n_heads + n_kv + g) * d, d * sizeof(float));
      }
    }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t items = b_count * t_count * n_heads;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> p(static_cast<size_t>(pos + t_count));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / n_heads, h = it % n_heads, b = n / t_count, slot = pos + n % t_count;
      const int64_t cache_at = (b * n_kv + h / group) * s_max * d;
      attend_one(&q[it * d], k_cache + cache_at, v_cache + cache_at, std::min(pad[b], slot), slot, d, scale, p.data(),
                 out + it * d);
    }
  }
}


}  // extern "C"
