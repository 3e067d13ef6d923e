// Dense decode kernels: GEMV over one or several weights sharing an input, the SwiGLU input, RMSNorm.
#include "common.h"

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
#pragma omp for schedule(dynamic, kChunk) nowait
      for (int64_t r = 0; r < m; ++r) {
        float out[kMaxTokens];
        dot_tokens(ws[s] + r * k, x, k, k, t_count, out, ws[s] + std::min(r + kAhead, m - 1) * k);
        for (int64_t t = 0; t < t_count; ++t) {
          float* dst = y + t * ldy + col0 + r;
          *dst = accumulate ? *dst + out[t] : out[t];
        }
      }
      col0 += m;
    }
  }
}

// h[t, i] = silu(w_gate[i] . x[t]) * (w_up[i] . x[t]): the dense SwiGLU input in one pass.
void ar_gate_up_silu(const float* x, int64_t t_count, int64_t k, const float* wg, const float* wu, int64_t f,
                     float* h, int nthreads) {
#pragma omp parallel for schedule(dynamic, kChunk) num_threads(nthreads)
  for (int64_t i = 0; i < f; ++i) {
    float g[kMaxTokens], u[kMaxTokens];
    const int64_t j = std::min(i + kAhead, f - 1);
    dot_tokens(wg + i * k, x, k, k, t_count, g, wg + j * k);
    dot_tokens(wu + i * k, x, k, k, t_count, u, wu + j * k);
    for (int64_t t = 0; t < t_count; ++t) h[t * f + i] = silu(g[t]) * u[t];
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

}  // extern "C"
