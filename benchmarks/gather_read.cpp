// How fast scattered units can be read at all: the routed gather's memory pattern without its
// arithmetic (docs/perf.md, "The routed FFN alone, decomposed"). Self-contained, no adaroute headers:
//
//   g++ -O3 -march=native -fopenmp -std=c++17 benchmarks/gather_read.cpp -o out/gather_read
//   out/gather_read [threads] [json path]       # defaults: 2, out/gather_read.json
//
// 60 layers of 1536 units of 6912 bytes (the embedded model's unit: gate row, up row, down column,
// float32), 637 MB. Per layer each thread takes its half of the units and reads a random share d of
// them in ascending order (AVX-512 sums), d = 0.35, 0.5 and 1: unit by unit without software prefetch;
// unit by unit requesting the unit k places on line by line while the current one is read (k = 1, 2,
// 4); and the routed kernel's pattern (RoutedCall::gather_units1): four units' gate and up rows read
// interleaved while their down rows and the next four's gate rows are requested into L2, then the
// four down rows. Best of 5 per variant; GB/s of unit bytes read.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int kH = 576, kUnit = 3 * kH, kUnits = 1536, kLayers = 60;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Unit by unit; ahead > 0: the unit `ahead` places on is requested line by line meanwhile.
float unit_by_unit(const float* w, const std::vector<int>& list, int ahead) {
  __m512 s = _mm512_setzero_ps();
  const int n = static_cast<int>(list.size());
  for (int p = 0; p < n; ++p) {
    const float* u = w + static_cast<size_t>(list[p]) * kUnit;
    const float* a = w + static_cast<size_t>(list[std::min(p + ahead, n - 1)]) * kUnit;
    for (int k = 0; k < kUnit; k += 16) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(a + k), _MM_HINT_T0);
      s = _mm512_add_ps(s, _mm512_loadu_ps(u + k));
    }
  }
  return _mm512_reduce_add_ps(s);
}

// The kernel's two passes over groups of four units.
float kernel_pattern(const float* w, const std::vector<int>& list) {
  __m512 s = _mm512_setzero_ps(), t = _mm512_setzero_ps();
  const int n = static_cast<int>(list.size());
  for (int p = 0; p < n; p += 4) {
    const float *u[4], *next[4];
    for (int r = 0; r < 4; ++r) {
      u[r] = w + static_cast<size_t>(list[std::min(p + r, n - 1)]) * kUnit;
      next[r] = w + static_cast<size_t>(list[std::min(p + 4 + r, n - 1)]) * kUnit;
    }
    for (int k = 0; k < kH; k += 16)
      for (int r = 0; r < 4; ++r) {
        s = _mm512_add_ps(s, _mm512_add_ps(_mm512_loadu_ps(u[r] + k), _mm512_loadu_ps(u[r] + kH + k)));
        _mm_prefetch(reinterpret_cast<const char*>(u[r] + 2 * kH + k), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(next[r] + k), _MM_HINT_T1);
      }
    for (int k = 0; k < kH; k += 16)
      for (int r = 0; r < 4; ++r) t = _mm512_add_ps(t, _mm512_loadu_ps(u[r] + 2 * kH + k));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s, t));
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const std::string json = argc > 2 ? argv[2] : "out/gather_read.json";
  const size_t n = static_cast<size_t>(kLayers) * kUnits * kUnit;
  float* w = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  for (size_t i = 0; i < n; ++i) w[i] = 1e-3f * static_cast<float>(i % 7);
  std::mt19937 rng(1);
  std::string out = "[";
  std::printf("%d threads, %d layers of %d units of %d bytes; best of 5\n", threads, kLayers, kUnits, kUnit * 4);
  for (double d : {0.35, 0.5, 1.0}) {
    std::vector<std::vector<int>> lists(static_cast<size_t>(kLayers) * threads);  // [layer][thread]
    size_t chosen = 0;
    for (int l = 0; l < kLayers; ++l)
      for (int t = 0; t < threads; ++t)
        for (int i = kUnits * t / threads; i < kUnits * (t + 1) / threads; ++i)
          if (d >= 1.0 || std::uniform_real_distribution<>(0, 1)(rng) < d) {
            lists[static_cast<size_t>(l) * threads + t].push_back(l * kUnits + i);
            ++chosen;
          }
    for (int variant = 0; variant < 5; ++variant) {
      static const char* names[] = {"unit by unit", "next unit ahead", "2 units ahead", "4 units ahead",
                                    "kernel's pattern"};
      double best = 1e9;
      for (int rep = 0; rep < 5; ++rep) {
        const double t0 = now();
        float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
        for (int l = 0; l < kLayers; ++l) {
          const auto& list = lists[static_cast<size_t>(l) * threads + omp_get_thread_num()];
          if (list.empty()) continue;
          total += variant == 4 ? kernel_pattern(w, list) : unit_by_unit(w, list, variant == 3 ? 4 : variant);
        }
        best = std::min(best, now() - t0);
        if (total == 123.0f) std::printf(" ");  // keeps the sums alive
      }
      const double gbs = static_cast<double>(chosen) * kUnit * 4 / best / 1e9;
      std::printf("d = %.2f  %-18s %6.1f GB/s  %7.1f us per layer\n", d, names[variant], gbs, best / kLayers * 1e6);
      char row[200];
      std::snprintf(row, sizeof row, "%s{\"density\": %.2f, \"variant\": \"%s\", \"gb_per_s\": %.2f}",
                    out.size() > 1 ? ", " : "", d, names[variant], gbs);
      out += row;
    }
  }
  out += "]\n";
  if (FILE* f = std::fopen(json.c_str(), "w")) {
    std::fputs(out.c_str(), f);
    std::fclose(f);
  }
  std::free(w);
}
