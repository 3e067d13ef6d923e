// The routed FFN for a few tokens in flight: score every unit from the int4 shadow, select per
// token, then read only the selected units' gate row, up row and down column (row of w_down_t).
//   G  int4 quantisation groups per row (H / 32)
#include "common.h"

#include <atomic>

namespace {

constexpr int kScoreBlock = 64; // units scored per work item
constexpr int kGroup = 32;     // columns per dequantisation step (16 bytes of int4); scale groups are multiples

#ifdef __AVX512F__
// exp and log for 16 lanes (Cephes-style, ~1e-7 relative): scoring every unit with scalar libm
// calls cost as much as reading the int4 shadow itself.
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

// log(x) for x > 0: x = m * 2^k with m in [0.75, 1.5), log m = 2 atanh((m - 1) / (m + 1)).
inline __m512 vlog(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
  __m512 k = _mm512_getexp_ps(x);
  k = _mm512_mask_add_ps(k, _mm512_cmp_ps_mask(m, one, _CMP_LT_OQ), k, one);
  const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 p = _mm512_set1_ps(1.0f / 9);
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 7));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 5));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 3));
  p = _mm512_fmadd_ps(p, s2, one);
  return _mm512_fmadd_ps(k, _mm512_set1_ps(0.693147180559945f), _mm512_mul_ps(_mm512_add_ps(s, s), p));
}
#endif

// score[i] = log(|silu(g[i]) * u[i]| + 1e-20) + bias[i] for n units.
inline void unit_scores(const float* g, const float* u, const float* bias, int64_t n, float* score) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f), tiny = _mm512_set1_ps(1e-20f);
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    const __m512 z = _mm512_add_ps(_mm512_abs_ps(_mm512_mul_ps(_mm512_mul_ps(gv, sig), uv)), tiny);
    _mm512_mask_storeu_ps(score + i, m, _mm512_add_ps(vlog(z), _mm512_maskz_loadu_ps(m, bias + i)));
  }
#endif
  for (; i < n; ++i) score[i] = std::log(std::fabs(silu(g[i]) * u[i]) + 1e-20f) + bias[i];
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

// One routed FFN call: the inputs, the scratch, and the three kinds of work on them.
struct RoutedCall {
  const float *x, *wg, *wu, *wd_t, *shadow_scale, *unit_bias;
  const uint8_t* shadow_q;
  int nt;
  int64_t h, ldw, f, half, groups, per_scale, scale_cols;  // ldw: row stride of the three weights
  float threshold;
  std::vector<float> xe, xo, score;  // [T, H/2] twice, [T, F]
  std::vector<uint8_t> mask;         // [T, F]: unit computed for token

  // Scores of units [i0, i1) for every token, and the threshold part of the selection.
  void score_units(int64_t i0, int64_t i1) {
    float gh[kMaxTokens * kScoreBlock], uh[kMaxTokens * kScoreBlock];  // [T][units]
    const int64_t n = i1 - i0;
    for (int64_t i = i0; i < i1; ++i)
      for (int t0 = 0; t0 < nt; t0 += kTokBlock) {
        const int nc = std::min(kTokBlock, nt - t0);
        float g[kTokBlock], u[kTokBlock];
        shadow_pair_n(shadow_q + i * half, shadow_q + (f + i) * half, shadow_scale + i * scale_cols,
                      shadow_scale + (f + i) * scale_cols, xe.data() + t0 * half, xo.data() + t0 * half, half,
                      groups, per_scale, nc, g, u);
        for (int t = 0; t < nc; ++t) {
          gh[(t0 + t) * kScoreBlock + (i - i0)] = g[t];
          uh[(t0 + t) * kScoreBlock + (i - i0)] = u[t];
        }
      }
    for (int t = 0; t < nt; ++t) {
      float* st = &score[t * f + i0];
      unit_scores(gh + t * kScoreBlock, uh + t * kScoreBlock, unit_bias + i0, n, st);
      for (int64_t k = 0; k < n; ++k) mask[t * f + i0 + k] = st[k] >= threshold;
    }
  }

  bool wanted(int64_t i) const {
    for (int t = 0; t < nt; ++t)
      if (mask[t * f + i]) return true;
    return false;
  }

  // acc[t] += silu(g) * u * w_down_t[i] for the tokens that selected unit i; prefetches unit ``ahead``.
  void gather_unit(int64_t i, int64_t ahead, float* acc) const {
    float g[kMaxTokens], u[kMaxTokens], a[kMaxTokens];
    dot_tokens(wg + i * ldw, x, h, h, nt, g, wg + ahead * ldw);
    dot_tokens(wu + i * ldw, x, h, h, nt, u, wu + ahead * ldw);
    for (int t = 0; t < nt; ++t) a[t] = mask[t * f + i] ? silu(g[t]) * u[t] : 0.0f;
    axpy_tokens(wd_t + i * ldw, a, nt, acc, h, h, wd_t + ahead * ldw);
  }

  // Gathers the listed units (ascending), interleaving the scoring of units [s0, s1): the int4
  // arithmetic then runs while the gathered rows are still on their way from memory.
  void gather_list(const std::vector<int>& units, int64_t s0, int64_t s1, float* acc) {
    const int64_t n = static_cast<int64_t>(units.size());
    int64_t scored = s0;
    for (int64_t p = 0; p < n; ++p) {
      // Selected rows are scattered and only ~36 cache lines long, too short for the hardware
      // prefetcher to ramp up: each row asks for the same row of the unit kAhead places on (into L2).
      gather_unit(units[p], units[std::min(p + kAhead, n - 1)], acc);
      const int64_t upto = s0 + (s1 - s0) * (p + 1) / n;
      if (upto > scored) score_units(scored, upto);
      scored = std::max(scored, upto);
    }
    if (scored < s1) score_units(scored, s1);
  }
};

// Pipelined pass of one thread: blocks of units are taken in turn; while a block's threshold-selected
// units are gathered, the next block is scored.
void pipelined_pass(RoutedCall& call, std::atomic<int64_t>& next_block, float* acc) {
  auto take = [&]() { return std::min(next_block.fetch_add(kScoreBlock), call.f); };
  std::vector<int> chosen;
  int64_t cur = take();
  call.score_units(cur, std::min(cur + kScoreBlock, call.f));
  while (cur < call.f) {
    const int64_t nxt = take();
    chosen.clear();
    for (int64_t i = cur; i < std::min(cur + kScoreBlock, call.f); ++i)
      if (call.wanted(i)) chosen.push_back(static_cast<int>(i));
    call.gather_list(chosen, nxt, std::min(nxt + kScoreBlock, call.f), acc);
    cur = nxt;
  }
}

}  // namespace

extern "C" {

// Routed FFN for a few tokens in flight (group_size a multiple of 32 dividing H): score every unit
// from the int4 shadow, select per token, and read only the selected units' gate row, up row and
// down column (row of w_down_t). all_units != 0 skips scoring and selection (the dense FFN in the
// unit-contiguous layout). y is [T, H]; with accumulate the result is added to it. counts is [T].
// ldw is the row stride of w_gate, w_up and w_down_t (H when contiguous; 3H when one unit's three
// rows are stored side by side, which turns each unit into one contiguous read).
//
// The threshold alone decides most selections, and it decides each unit on its own, so one pass
// scores and gathers together. Only when a min/max guard binds for some token is that pass thrown
// away and the selection redone with the guards (which need every score first).
void ar_routed_ffn(const float* x, int64_t t_count, int64_t h, int64_t f, const float* wg, const float* wu,
                   const float* wd_t, int64_t ldw, const uint8_t* shadow_q, const float* shadow_scale, int64_t group_size,
                   const float* unit_bias, float threshold, int64_t min_units, int64_t max_units,
                   int all_units, float* y, int64_t* counts, int accumulate, int nthreads) {
  const int nt = static_cast<int>(t_count);
  RoutedCall call{x, wg, wu, wd_t, shadow_scale, unit_bias, shadow_q, nt, h, ldw, f, h / 2, h / kGroup,
                  group_size / kGroup, h / std::max<int64_t>(group_size, 1), threshold, {}, {}, {}, {}};
  call.xe.resize(nt * call.half);
  call.xo.resize(nt * call.half);
  call.score.resize(nt * f);
  call.mask.assign(nt * f, all_units ? 1 : 0);
  for (int t = 0; t < nt; ++t)
    for (int64_t j = 0; j < call.half; ++j) {
      call.xe[t * call.half + j] = x[t * h + 2 * j];
      call.xo[t * call.half + j] = x[t * h + 2 * j + 1];
    }
  std::vector<float> partial;
  std::vector<int> units;
  std::atomic<int64_t> next_block{0};
  bool redo = static_cast<bool>(all_units);
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp single
    partial.assign(static_cast<size_t>(omp_get_num_threads()) * nt * h, 0.0f);
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    float* acc = partial.data() + static_cast<size_t>(tid) * nt * h;
    if (!all_units) pipelined_pass(call, next_block, acc);
#pragma omp barrier
#pragma omp single
    {
      for (int t = 0; t < nt && !all_units; ++t) {
        counts[t] = std::count(call.mask.begin() + t * f, call.mask.begin() + (t + 1) * f, 1);
        redo = redo || counts[t] < std::min(min_units, f) || counts[t] > std::max<int64_t>(max_units, 0);
      }
    }
    if (redo) {  // guards bind (or every unit is wanted): select with every score known, then gather
      std::fill(acc, acc + nt * h, 0.0f);
      if (!all_units) {
#pragma omp for schedule(static)
        for (int t = 0; t < nt; ++t)
          counts[t] = select_token(&call.score[t * f], f, threshold, min_units, max_units, &call.mask[t * f]);
      }
#pragma omp single
      {
        for (int64_t i = 0; i < f; ++i)
          if (call.wanted(i)) units.push_back(static_cast<int>(i));
        if (all_units) std::fill(counts, counts + nt, f);
      }
      const int64_t nu = static_cast<int64_t>(units.size());
#pragma omp for schedule(dynamic, kChunk) nowait
      for (int64_t p = 0; p < nu; ++p) call.gather_unit(units[p], units[std::min(p + kAhead, nu - 1)], acc);
#pragma omp barrier
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nt * h; ++c) {
      float s = accumulate ? y[c] : 0.0f;
      for (int th = 0; th < team; ++th) s += partial[static_cast<size_t>(th) * nt * h + c];
      y[c] = s;
    }
  }
}

}  // extern "C"
