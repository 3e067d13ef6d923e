// Decode-time CPU kernels: dense GEMV and the fused routed FFN (score -> select -> compute).
//
// Shape letters:
//   T  tokens in flight (decode: 1 per sequence)     H  hidden size (input length of every row)
//   M  output rows of a dense weight                   F  FFN units (gate/up rows, down columns)
//   G  int4 quantisation groups per row (H / 32)
//
// Decode reads every weight byte once per token, so these kernels are memory-bound: the aim is to
// stream each selected row exactly once, reuse it for all T tokens, and keep enough independent
// FMA chains in flight that the loads, not the FMA latency, set the pace.
// Plain C ABI (called through ctypes) so the library builds in seconds without framework headers.

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

constexpr int kRowBlock = 4;   // rows dotted together: 4 independent FMA chains per token
constexpr int kTokBlock = 4;   // tokens sharing one load of a weight row
constexpr int kGroup = 32;     // columns per dequantisation step (16 bytes of int4); scale groups are multiples

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// out[r * NT + t] = dot(w[r], x[t]) for R rows and NT tokens; x rows are ldx apart.
template <int R, int NT>
inline void dot_block(const float* const* w, const float* x, int64_t ldx, int64_t k, float* out) {
#ifdef __AVX512F__
  __m512 acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * ldx + kk);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w[r] + kk);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  if (kk < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - kk)) - 1u);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, w[r] + kk);
      for (int t = 0; t < NT; ++t)
        acc[r][t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + t * ldx + kk), acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) out[r * NT + t] = _mm512_reduce_add_ps(acc[r][t]);
#else
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) {
      const float* wr = w[r];
      const float* xt = x + t * ldx;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t kk = 0; kk < k; ++kk) s += wr[kk] * xt[kk];
      out[r * NT + t] = s;
    }
#endif
}

// Same for any token count nt <= kTokBlock; out is [R][nt].
template <int R>
inline void dot_rows(const float* const* w, const float* x, int64_t ldx, int64_t k, int nt, float* out) {
  switch (nt) {
    case 4: dot_block<R, 4>(w, x, ldx, k, out); break;
    case 3: dot_block<R, 3>(w, x, ldx, k, out); break;
    case 2: dot_block<R, 2>(w, x, ldx, k, out); break;
    default: dot_block<R, 1>(w, x, ldx, k, out); break;
  }
}

// y[t] += a[t] * row for nt tokens; y rows are ldy apart.
inline void axpy_tokens(const float* row, const float* a, int nt, float* y, int64_t ldy, int64_t h) {
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

// Dot products of one int4 shadow row pair (gate row, up row) with nt tokens.
// x is given de-interleaved: xe[t] holds the even columns, xo[t] the odd ones, so that the low and
// high nibbles of each byte line up with contiguous vectors and nothing is shuffled per weight.
template <int NT>
inline void shadow_pair(const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su,
                        const float* xe, const float* xo, int64_t half, int64_t groups, int64_t per_scale,
                        float* gout, float* uout) {
#ifdef __AVX512F__
  alignas(64) static const float kLevels[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
  const __m512 levels = _mm512_load_ps(kLevels);
  const __m512i low4 = _mm512_set1_epi32(0xF);
  __m512 accg[NT], accu[NT];
  for (int t = 0; t < NT; ++t) accg[t] = accu[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i bg = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + 16 * g)));
    const __m512i bu = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qu + 16 * g)));
    // Stored value q + 8 in [0, 15] indexes the level table: one permute dequantises 16 weights.
    const __m512 glo = _mm512_permutexvar_ps(_mm512_and_si512(bg, low4), levels);
    const __m512 ghi = _mm512_permutexvar_ps(_mm512_srli_epi32(bg, 4), levels);
    const __m512 ulo = _mm512_permutexvar_ps(_mm512_and_si512(bu, low4), levels);
    const __m512 uhi = _mm512_permutexvar_ps(_mm512_srli_epi32(bu, 4), levels);
    const __m512 gs = _mm512_set1_ps(sg[g / per_scale]);
    const __m512 us = _mm512_set1_ps(su[g / per_scale]);
    for (int t = 0; t < NT; ++t) {
      const __m512 e = _mm512_loadu_ps(xe + t * half + 16 * g);
      const __m512 o = _mm512_loadu_ps(xo + t * half + 16 * g);
      accg[t] = _mm512_fmadd_ps(_mm512_fmadd_ps(ghi, o, _mm512_mul_ps(glo, e)), gs, accg[t]);
      accu[t] = _mm512_fmadd_ps(_mm512_fmadd_ps(uhi, o, _mm512_mul_ps(ulo, e)), us, accu[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    gout[t] = _mm512_reduce_add_ps(accg[t]);
    uout[t] = _mm512_reduce_add_ps(accu[t]);
  }
#else
  for (int t = 0; t < NT; ++t) {
    float ga = 0.0f, ua = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      float gd = 0.0f, ud = 0.0f;
      for (int j = 0; j < kGroup / 2; ++j) {
        const int64_t b = 16 * g + j;
        const float e = xe[t * half + b], o = xo[t * half + b];
        gd += ((qg[b] & 0xF) - 8) * e + ((qg[b] >> 4) - 8) * o;
        ud += ((qu[b] & 0xF) - 8) * e + ((qu[b] >> 4) - 8) * o;
      }
      ga += gd * sg[g / per_scale];
      ua += ud * su[g / per_scale];
    }
    gout[t] = ga;
    uout[t] = ua;
  }
#endif
}

void shadow_pair_n(const uint8_t* qg, const uint8_t* qu, const float* sg, const float* su, const float* xe,
                   const float* xo, int64_t half, int64_t groups, int64_t per_scale, int nt, float* gout,
                   float* uout) {
  switch (nt) {
    case 4: shadow_pair<4>(qg, qu, sg, su, xe, xo, half, groups, per_scale, gout, uout); break;
    case 3: shadow_pair<3>(qg, qu, sg, su, xe, xo, half, groups, per_scale, gout, uout); break;
    case 2: shadow_pair<2>(qg, qu, sg, su, xe, xo, half, groups, per_scale, gout, uout); break;
    default: shadow_pair<1>(qg, qu, sg, su, xe, xo, half, groups, per_scale, gout, uout); break;
  }
}

// Keeps the k highest-scoring entries of idx (k < idx.size()), returned in ascending unit order so
// that the compute phase walks memory forwards.
void keep_top(std::vector<int>& idx, const float* score, int64_t k) {
  std::nth_element(idx.begin(), idx.begin() + k, idx.end(),
                   [score](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
}

// Selection policy for one token: threshold, then the min / max guards, in that order.
int64_t select_token(const float* score, int64_t f, float threshold, int64_t min_units, int64_t max_units,
                     uint8_t* mask) {
  std::vector<int> idx;
  idx.reserve(f);
  for (int64_t i = 0; i < f; ++i)
    if (score[i] >= threshold) idx.push_back(static_cast<int>(i));
  if (static_cast<int64_t>(idx.size()) < min_units) {
    idx.resize(f);
    for (int64_t i = 0; i < f; ++i) idx[i] = static_cast<int>(i);
    keep_top(idx, score, std::min(min_units, f));
  }
  if (static_cast<int64_t>(idx.size()) > max_units) keep_top(idx, score, std::max<int64_t>(max_units, 0));
  std::memset(mask, 0, f);
  for (int i : idx) mask[i] = 1;
  return static_cast<int64_t>(idx.size());
}


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

// Softmax-weighted sum of cached values for one query: out = sum_j softmax(q . k_j * scale) v_j, j in [lo, hi].
void attend_one(const float* q, const float* kc, const float* vc, int64_t lo, int64_t hi, int64_t d, float scale,
                float* p, float* out) {
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

int ar_abi_version() { return 1; }

int ar_has_avx512() {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

// y[t, col0(s) + m] (+)= dot(ws[s][m], x[t]) for every segment s; segments land side by side in y,
// which is how q, k and v (or any weights sharing an input) become one pass over one thread team.
void ar_linear(const float* x, int64_t t_count, int64_t k, int nseg, const float* const* ws,
               const int64_t* rows, float* y, int64_t ldy, int accumulate, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    int64_t col0 = 0;
    for (int s = 0; s < nseg; ++s) {
      const int64_t m = rows[s];
      const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
#pragma omp for schedule(static) nowait
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r0 = b * kRowBlock;
        const int nr = static_cast<int>(std::min<int64_t>(kRowBlock, m - r0));
        for (int64_t t0 = 0; t0 < t_count; t0 += kTokBlock) {
          const int nt = static_cast<int>(std::min<int64_t>(kTokBlock, t_count - t0));
          float out[kRowBlock * kTokBlock];
          const float* w[kRowBlock];
          for (int r = 0; r < kRowBlock; ++r) w[r] = ws[s] + (r0 + std::min(r, nr - 1)) * k;
          dot_rows<kRowBlock>(w, x + t0 * k, k, k, nt, out);
          for (int r = 0; r < nr; ++r)
            for (int t = 0; t < nt; ++t) {
              float* dst = y + (t0 + t) * ldy + col0 + r0 + r;
              *dst = accumulate ? *dst + out[r * nt + t] : out[r * nt + t];
            }
        }
      }
      col0 += m;
    }
  }
}

// h[t, i] = silu(w_gate[i] . x[t]) * (w_up[i] . x[t]): the dense SwiGLU input in one pass.
void ar_gate_up_silu(const float* x, int64_t t_count, int64_t k, const float* wg, const float* wu, int64_t f,
                     float* h, int nthreads) {
  const int64_t blocks = (f + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = 2 * b;
    const int64_t i1 = std::min(i0 + 1, f - 1);
    const float* w[4] = {wg + i0 * k, wg + i1 * k, wu + i0 * k, wu + i1 * k};
    for (int64_t t0 = 0; t0 < t_count; t0 += kTokBlock) {
      const int nt = static_cast<int>(std::min<int64_t>(kTokBlock, t_count - t0));
      float out[4 * kTokBlock];
      dot_rows<4>(w, x + t0 * k, k, k, nt, out);
      for (int t = 0; t < nt; ++t) {
        h[(t0 + t) * f + i0] = silu(out[0 * nt + t]) * out[2 * nt + t];
        if (i1 != i0) h[(t0 + t) * f + i1] = silu(out[1 * nt + t]) * out[3 * nt + t];
      }
    }
  }
}

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w
void ar_rmsnorm(const float* x, int64_t t_count, int64_t h, const float* w, float eps, float* out) {
  for (int64_t t = 0; t < t_count; ++t) {
    const float* xt = x + t * h;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < h; ++i) ss += xt[i] * xt[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
    float* ot = out + t * h;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) ot[i] = w[i] * (xt[i] * inv);
  }
}

// Routed FFN for a few tokens in flight (group_size a multiple of 32, dividing H): score every unit from the int4 shadow, select per token,
// then read only the selected units' gate row, up row and down column (row of w_down_t).
// all_units != 0 skips scoring and selection (dense FFN in the unit-contiguous layout).
// y is [T, H]; with accumulate it is added to (residual stream). counts is [T].
void ar_routed_ffn(const float* x, int64_t t_count, int64_t h, int64_t f, const float* wg, const float* wu,
                   const float* wd_t, const uint8_t* shadow_q, const float* shadow_scale, int64_t group_size,
                   const float* unit_bias, float threshold, int64_t min_units, int64_t max_units,
                   int all_units, float* y, int64_t* counts, int accumulate, int nthreads) {
  const int nt = static_cast<int>(t_count);
  const int64_t half = h / 2, groups = h / kGroup, per_scale = group_size / kGroup;
  const int64_t scale_cols = h / std::max<int64_t>(group_size, 1);
  std::vector<float> xe(nt * half), xo(nt * half), score(nt * f);
  std::vector<uint8_t> mask(nt * f, 1);
  std::vector<int> units;
  for (int t = 0; t < nt; ++t)
    for (int64_t j = 0; j < half; ++j) {
      xe[t * half + j] = x[t * h + 2 * j];
      xo[t * half + j] = x[t * h + 2 * j + 1];
    }
  std::vector<float> partial;
#pragma omp parallel num_threads(nthreads)
  {
    if (!all_units) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < f; ++i) {
        for (int t0 = 0; t0 < nt; t0 += kTokBlock) {
          const int nc = std::min(kTokBlock, nt - t0);
          float g[kTokBlock], u[kTokBlock];
          shadow_pair_n(shadow_q + i * half, shadow_q + (f + i) * half, shadow_scale + i * scale_cols,
                        shadow_scale + (f + i) * scale_cols, xe.data() + t0 * half, xo.data() + t0 * half,
                        half, groups, per_scale, nc, g, u);
          for (int t = 0; t < nc; ++t)
            score[(t0 + t) * f + i] = std::log(std::fabs(silu(g[t]) * u[t]) + 1e-20f) + unit_bias[i];
        }
      }
#pragma omp for schedule(static)
      for (int t = 0; t < nt; ++t)
        counts[t] = select_token(&score[t * f], f, threshold, min_units, max_units, &mask[t * f]);
    }
#pragma omp single
    {
      for (int64_t i = 0; i < f; ++i) {
        bool any = false;
        for (int t = 0; t < nt; ++t) any = any || mask[t * f + i];
        if (any) units.push_back(static_cast<int>(i));
      }
      if (all_units)
        for (int t = 0; t < nt; ++t) counts[t] = f;
      partial.assign(static_cast<size_t>(omp_get_num_threads()) * nt * h, 0.0f);
    }
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t nu = static_cast<int64_t>(units.size());
    const int64_t lo = nu * tid / team, hi = nu * (tid + 1) / team;
    float* acc = partial.data() + static_cast<size_t>(tid) * nt * h;
    for (int64_t p = lo; p < hi; p += 2) {
      const int64_t i0 = units[p], i1 = units[std::min(p + 1, hi - 1)];
      const float* w[4] = {wg + i0 * h, wg + i1 * h, wu + i0 * h, wu + i1 * h};
      for (int t0 = 0; t0 < nt; t0 += kTokBlock) {
        const int nc = std::min(kTokBlock, nt - t0);
        float out[4 * kTokBlock], a0[kTokBlock], a1[kTokBlock];
        dot_rows<4>(w, x + t0 * h, h, h, nc, out);
        for (int t = 0; t < nc; ++t) {
          a0[t] = mask[(t0 + t) * f + i0] ? silu(out[t]) * out[2 * nc + t] : 0.0f;
          a1[t] = mask[(t0 + t) * f + i1] ? silu(out[nc + t]) * out[3 * nc + t] : 0.0f;
        }
        axpy_tokens(wd_t + i0 * h, a0, nc, acc + t0 * h, h, h);
        if (i1 != i0) axpy_tokens(wd_t + i1 * h, a1, nc, acc + t0 * h, h, h);
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nt * h; ++c) {
      float s = accumulate ? y[c] : 0.0f;
      for (int th = 0; th < team; ++th) s += partial[static_cast<size_t>(th) * nt * h + c];
      y[c] = s;
    }
  }
}

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
