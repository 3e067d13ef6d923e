// How far ahead software prefetch should run in a streamed weight read, and how the rows of a dense
// GEMV should be shared between threads (docs/perf.md, item 27). Self-contained, no adaroute headers:
//
//   g++ -O3 -march=native -fopenmp -std=c++17 benchmarks/stream_prefetch.cpp -o out/stream_prefetch
//   out/stream_prefetch [threads] [json path]       # defaults: 2, out/stream_prefetch.json
//
// Part 1: a plain read of 512 MB (AVX-512 sums), each thread one contiguous half, with the software
// prefetch 0 ... 32 KB ahead. Part 2: the dense decode step's GEMVs of the embedded model (30 layers
// of q/k/v 960 x 576, o 576 x 576, gate+up 3072 x 576, down 576 x 1536, then the head 49152 x 576;
// 538 MB) for one token: 32-row chunks handed out dynamically with the prefetch two rows ahead, against
// one contiguous share per thread with the prefetch 4 ... 32 KB ahead. Every variant runs once per
// round, rounds interleaved; the table gives mean GB/s over the rounds and the ratio to the first row.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

float read_all(const float* a, size_t n, size_t ahead, int threads) {
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const size_t t = omp_get_thread_num(), team = omp_get_num_threads();
    const size_t lo = n * t / team / 64 * 64, hi = t + 1 == team ? n : n * (t + 1) / team / 64 * 64;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = lo; i + 64 <= hi; i += 64) {
      if (ahead)
        for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(a + i + ahead + 16 * j), _MM_HINT_T1);
      s0 = _mm512_add_ps(s0, _mm512_load_ps(a + i));
      s1 = _mm512_add_ps(s1, _mm512_load_ps(a + i + 16));
      s2 = _mm512_add_ps(s2, _mm512_load_ps(a + i + 32));
      s3 = _mm512_add_ps(s3, _mm512_load_ps(a + i + 48));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  }
  return total;
}

// dot(w, x) over k (a multiple of 64) with four partial sums, prefetching k floats from ``ahead``.
float dot(const float* w, const float* x, int64_t k, const float* ahead) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t kk = 0; kk < k; kk += 64)
    for (int s = 0; s < 4; ++s) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + kk + 16 * s), _MM_HINT_T1);
      acc[s] = _mm512_fmadd_ps(_mm512_loadu_ps(w + kk + 16 * s), _mm512_loadu_ps(x + kk + 16 * s), acc[s]);
    }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// ahead_floats < 0: dynamic 32-row chunks, prefetch two rows ahead; else static shares, that far ahead.
void gemv(const float* w, int64_t m, int64_t k, const float* x, float* y, int64_t ahead_floats, int threads) {
  if (ahead_floats < 0) {
#pragma omp parallel for schedule(dynamic, 32) num_threads(threads)
    for (int64_t r = 0; r < m; ++r) y[r] = dot(w + r * k, x, k, w + std::min(r + 2, m - 1) * k);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t lo = m * t / team, hi = m * (t + 1) / team;
    const float* end = w + hi * k;
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = w + r * k;
      y[r] = dot(row, x, k, std::max(row, std::min(row + ahead_floats, end - k)));
    }
  }
}

struct Row {
  std::string name;
  double sum = 0.0;
};

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const std::string json = argc > 2 ? argv[2] : "out/stream_prefetch.json";
  const int rounds = 6;
  const size_t n = (512ull << 20) / 4;
  float* a = static_cast<float*>(std::aligned_alloc(64, n * 4));
  for (size_t i = 0; i < n; ++i) a[i] = 1e-3f * static_cast<float>(i % 7);

  const int64_t H = 576, F = 1536, L = 30, V = 49152;
  struct Mat { int64_t m, k; float* w; };
  std::vector<Mat> mats;
  for (int l = 0; l < L; ++l)
    for (auto [m, k] : {std::pair<int64_t, int64_t>{960, H}, {H, H}, {2 * F, H}, {H, F}}) mats.push_back({m, k, nullptr});
  mats.push_back({V, H, nullptr});
  size_t gemv_bytes = 0;
  for (auto& mt : mats) {
    mt.w = static_cast<float*>(std::aligned_alloc(64, mt.m * mt.k * 4));
    for (int64_t i = 0; i < mt.m * mt.k; ++i) mt.w[i] = 1e-3f * static_cast<float>(i % 7);
    gemv_bytes += mt.m * mt.k * 4;
  }
  std::vector<float> x(F, 0.01f), y(V);

  const std::vector<size_t> read_ahead = {0, 512, 1024, 2048, 4096, 8192};        // floats
  const std::vector<int64_t> gemv_ahead = {-1, 1024, 2048, 4096, 8192};           // floats; -1: dynamic
  std::vector<Row> reads, gemvs;
  for (size_t d : read_ahead) reads.push_back({"read, prefetch " + std::to_string(d * 4 / 1024) + " KB ahead"});
  for (int64_t d : gemv_ahead)
    gemvs.push_back({d < 0 ? "gemv, dynamic 32 rows, 2 rows ahead" : "gemv, static, " + std::to_string(d * 4 / 1024) + " KB ahead"});
  volatile float sink = 0.0f;
  for (int r = 0; r < rounds; ++r) {
    for (size_t v = 0; v < read_ahead.size(); ++v) {
      const double t0 = now();
      sink = sink + read_all(a, n, read_ahead[v], threads);
      reads[v].sum += n * 4.0 / (now() - t0) / 1e9;
    }
    for (size_t v = 0; v < gemv_ahead.size(); ++v) {
      const double t0 = now();
      for (auto& mt : mats) gemv(mt.w, mt.m, mt.k, x.data(), y.data(), gemv_ahead[v], threads);
      gemvs[v].sum += gemv_bytes / (now() - t0) / 1e9;
    }
  }
  std::FILE* out = std::fopen(json.c_str(), "w");
  if (out) std::fprintf(out, "{\"threads\": %d, \"rounds\": %d, \"rows\": [", threads, rounds);
  bool first = true;
  std::printf("%d threads, %d rounds, mean GB/s (ratio to the first row of its part)\n", threads, rounds);
  for (auto* part : {&reads, &gemvs})
    for (const Row& row : *part) {
      const double gbs = row.sum / rounds, base = part->front().sum / rounds;
      std::printf("%-40s %6.1f GB/s  %.3f\n", row.name.c_str(), gbs, gbs / base);
      if (out) std::fprintf(out, "%s{\"name\": \"%s\", \"gb_s\": %.2f, \"ratio\": %.3f}", first ? "" : ", ", row.name.c_str(), gbs, gbs / base);
      first = false;
    }
  if (out) {
    std::fprintf(out, "]}\n");
    std::fclose(out);
  }
  return 0;
}
