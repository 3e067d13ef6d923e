// The routed output head's exact rows (reference.head_rows defines the product): per token, the K
// vocabulary rows whose shadow logits are highest get their exact float32 logits, the rest keep the
// shadow's. Selection and the K dot products run here because PyTorch has no "top-k, then dot only
// those rows" without copying the rows out first, and its topk alone cost as much as the K dots.
//
// Shape letters: T tokens, H hidden size, V vocabulary rows, K exact rows per token.
#include "common.h"

#include <functional>

namespace {

// Order-preserving map of a float onto uint32 (larger float -> larger key; -0 < +0).
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kBinBits = 12;  // first-level histogram: the key's top 12 bits

constexpr int64_t kSampleStride = 16;  // select_top_sampled: every 16th row's key is sampled

// select_top's fast path: a cut from a sample of the keys (every kSampleStride-th row; the cut sits a
// few standard deviations below where the k-th largest is expected), then one vectorised pass takes
// every row whose key is at least the cut, and nth_element picks the k among those (~1.7 k rows):
// the same set as the two-pass histogram, in ~1/4 of its time for the embedded model's head. Returns
// false, having written nothing, when fewer than k rows pass the cut or far more than k do (ties).
bool select_top_sampled(const float* v, int64_t n, int64_t k, int64_t* idx, std::vector<uint32_t>& keys,
                        std::vector<std::pair<uint32_t, int64_t>>& cand, std::vector<int32_t>& hits) {
#ifdef __AVX512F__
  const int64_t samples = n / kSampleStride;
  const int64_t r = k / kSampleStride + 2 * static_cast<int64_t>(std::sqrt(double(k) / kSampleStride)) + 4;
  if (n > INT32_MAX || samples < 64 || r >= samples) return false;
  keys.resize(samples);
  for (int64_t s = 0; s < samples; ++s) keys[s] = order_key(v[s * kSampleStride]);
  std::nth_element(keys.begin(), keys.begin() + (r - 1), keys.end(), std::greater<uint32_t>());
  const __m512i cut = _mm512_set1_epi32(static_cast<int32_t>(keys[r - 1])), top = _mm512_set1_epi32(INT32_MIN);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  hits.resize(n);
  int64_t c = 0, i = 0;
  for (; i + 16 <= n; i += 16) {  // order_key, 16 at a time: u ^ (sign ? 0xFFFFFFFF : 0x80000000)
    const __m512i u = _mm512_loadu_si512(v + i);
    const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), top));
    const __mmask16 m = _mm512_cmpge_epu32_mask(key, cut);
    _mm512_mask_compressstoreu_epi32(hits.data() + c, m, rows);
    c += _mm_popcnt_u32(m);
    rows = _mm512_add_epi32(rows, step);
  }
  for (; i < n; ++i)
    if (order_key(v[i]) >= keys[r - 1]) hits[c++] = static_cast<int32_t>(i);
  if (c < k || c > 8 * k + 1024) return false;
  cand.clear();
  for (int64_t j = 0; j < c; ++j) cand.emplace_back(~order_key(v[hits[j]]), hits[j]);
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end());  // descending key, then index
  for (int64_t j = 0; j < k; ++j) idx[j] = cand[j].second;
  return true;
#else
  (void)v, (void)n, (void)k, (void)idx, (void)keys, (void)cand, (void)hits;
  return false;
#endif
}

// idx[0..k) = the k largest of v[0..n), ties to the lower index (reference.top_rows's order is
// not required: the set is what counts). One pass builds keys and a histogram of their top bits,
// which names the bin holding the k-th largest; a second pass takes every row above that bin and
// collects the bin's rows, of which nth_element picks the rest.
void select_top(const float* v, int64_t n, int64_t k, int64_t* idx, std::vector<uint32_t>& keys,
                std::vector<std::pair<uint32_t, int64_t>>& cand, std::vector<int32_t>& hits) {
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) idx[i] = i;
    return;
  }
  if (select_top_sampled(v, n, k, idx, keys, cand, hits)) return;
  keys.resize(n);
  int64_t hist[1 << kBinBits] = {0};
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = order_key(v[i]);
    ++hist[keys[i] >> (32 - kBinBits)];
  }
  int64_t above = 0;
  uint32_t bin = (1u << kBinBits) - 1;
  while (above + hist[bin] < k) above += hist[bin--];
  int64_t m = 0;
  cand.clear();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = keys[i] >> (32 - kBinBits);
    if (b > bin) idx[m++] = i;
    else if (b == bin) cand.emplace_back(~keys[i], i);  // ascending pair order = descending key, then index
  }
  const int64_t need = k - m;
  std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end());
  for (int64_t j = 0; j < need; ++j) idx[m + j] = cand[j].second;
}

}  // namespace

extern "C" {

// logits [T, V] holds the shadow's logits on entry; on return the K rows each token selected
// (written to idx [T, K]) hold dot(w[row], x[t]) exactly. w [V, H] float32, x [T, H].
void ar_head_rows(const float* x, int64_t t_count, int64_t h, const float* w, int64_t v, float* logits, int64_t k,
                  int64_t* idx, int nthreads) {
  k = std::min(k, v);
#pragma omp parallel num_threads(nthreads)
  {
    // per thread and kept between calls (the pool's threads live on): no allocation per decoded token
    static thread_local std::vector<uint32_t> keys;
    static thread_local std::vector<std::pair<uint32_t, int64_t>> cand;
    static thread_local std::vector<int32_t> hits;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_count; ++t) select_top(logits + t * v, v, k, idx + t * k, keys, cand, hits);
    const int64_t total = t_count * k;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < total; ++j) {
      const int64_t t = j / k, row = idx[j];
      const float* ahead = j + kAhead < total ? w + idx[j + kAhead] * h : nullptr;
      float out;
      dot_tokens(w + row * h, x + t * h, h, h, 1, &out, ahead);
      logits[t * v + row] = out;
    }
  }
}

}  // extern "C"
