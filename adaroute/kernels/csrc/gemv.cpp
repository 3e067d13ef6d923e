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
// The segments' rows, end to end, are split into one contiguous share per thread (thread_share).
void ar_linear(const float* x, int64_t t_count, int64_t k, int nseg, const float* const* ws,
               const int64_t* rows, float* y, int64_t ldy, int accumulate, int nthreads) {
  int64_t total = 0;
  for (int s = 0; s < nseg; ++s) total += rows[s];
#pragma omp parallel num_threads(nthreads)
  {
    int64_t lo, hi;
    thread_share(total, lo, hi);
    int64_t col0 = 0;
    for (int s = 0; s < nseg; col0 += rows[s], ++s) {
      const int64_t r0 = std::max<int64_t>(lo - col0, 0), r1 = std::min(hi - col0, rows[s]);
      const float* end = ws[s] + r1 * k;
      for (int64_t r = r0; r < r1; ++r) {
        float out[kMaxTokens];
        const float* row = ws[s] + r * k;
        dot_tokens(row, x, k, k, t_count, out, stream_ahead(row, k, end));
        for (int64_t t = 0; t < t_count; ++t) {
          float* dst = y + t * ldy + col0 + r;
          *dst = accumulate ? *dst + out[t] : out[t];
        }
      }
    }
  }
}

// h[t, i] = silu(w_gate[i] . x[t]) * (w_up[i] . x[t]): the dense SwiGLU input in one pass.
void ar_gate_up_silu(const float* x, int64_t t_count, int64_t k, const float* wg, const float* wu, int64_t f,
                     float* h, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    int64_t lo, hi;
    thread_share(f, lo, hi);
    for (int64_t i = lo; i < hi; ++i) {
      float g[kMaxTokens], u[kMaxTokens];
      dot_tokens(wg + i * k, x, k, k, t_count, g, stream_ahead(wg + i * k, k, wg + hi * k));
      dot_tokens(wu + i * k, x, k, k, t_count, u, stream_ahead(wu + i * k, k, wu + hi * k));
      for (int64_t t = 0; t < t_count; ++t) h[t * f + i] = silu(g[t]) * u[t];
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

}  // extern "C"
