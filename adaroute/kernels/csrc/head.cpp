// The routed output head's exact rows (reference.head_rows defines the product): per token, the K
// vocabulary rows whose shadow logits are highest get their exact float32 logits, the rest keep the
// shadow's. Selection and the K dot products run here because PyTorch has no "top-k, then dot only
// those rows" without copying the rows out first, and its topk alone cost as much as the K dots.
//
// Shape letters: T tokens, H hidden size, V vocabulary rows, K exact rows per token.
#include "common.h"

namespace {

// Order-preserving map of a float onto uint32 (larger float -> larger key; -0 < +0).
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kBinBits = 12;  // first-level histogram: the key's top 12 bits

// idx[0..k) = the k largest of v[0..n), ties to the lower index (reference.top_rows's order is
// not required: the set is what counts). One pass builds keys and a histogram of their top bits,
// which names the bin holding the k-th largest; a second pass takes every row above that bin and
// collects the bin's rows, of which nth_element picks the rest.
void select_top(const float* v, int64_t n, int64_t k, int64_t* idx, std::vector<uint32_t>& keys,
                std::vector<std::pair<uint32_t, int64_t>>& cand) {
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) idx[i] = i;
    return;
  }
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
    std::vector<uint32_t> keys;
    std::vector<std::pair<uint32_t, int64_t>> cand;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_count; ++t) select_top(logits + t * v, v, k, idx + t * k, keys, cand);
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
