// Decode linear layers on CPUs with AVX-512 (chosen at run time; linear_small_m.cpp is the AVX2 kernel):
// - bf16 x and W on CPUs with AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4+): both
//   read as bf16 pairs by vdpbf16ps (32 multiply-adds per instruction, float32 accumulation), instead of
//   widening each weight to float32 and multiplying it into every input row with FMAs;
// - int8 codes (AVX512F/BW): widened to float32 16 at a time and multiplied into the float32 rows, twice the
//   width of the AVX2 kernel, which was compute-bound on the widening at batch 1 (8.5 GB/s of ~20).
// At 8 input rows the AVX2 kernel (linear_small_m.cpp) is compute-bound (a batch-8 decode step of SmolLM2-135M
// spent 23.7 ms in its linears, against ~14 ms to stream the weights); this one multiplies 4x more per instruction.
// The functions carry their own target attribute and run only where the CPU reports avx512_bf16, so the
// library still builds with -mavx2 and runs on AVX2-only machines.
// vdpbf16ps multiplies exactly and rounds each accumulation to float32 (round to nearest even, denormal
// inputs and outputs flushed to zero); the AVX2 kernel's FMAs round the same way, in another order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>

#include "linear_io.h"

#define LEANLM_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define LEANLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace {

constexpr int64_t PREFETCH_BYTES = 8192;  // as in linear_small_m.cpp

// ROWS weight rows from n against M bf16 input rows: ROWS * M float32 accumulators of 16 lanes.
template <int M, int ROWS>
LEANLM_AVX512BF16 inline void block(const uint16_t* x, const uint16_t* w, int64_t K, int64_t n, float* dots, int64_t N) {
  __m512 acc[ROWS][M];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const bool prefetch = (n + ROWS + 1) * K + PREFETCH_BYTES / 2 <= N * K;  // stays inside the weight matrix
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const uint16_t* row = w + (n + r) * K + k;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH_BYTES / 2), _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(row);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) dots[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M, int ROWS>
LEANLM_AVX512BF16 void rows(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, int64_t begin, int64_t end, float* dots) {
  int64_t n = begin;
  for (; n + ROWS <= end; n += ROWS) block<M, ROWS>(x, w, K, n, dots, N);
  for (; n < end; ++n) block<M, 1>(x, w, K, n, dots, N);
}

// m input rows (1..8): at most 16 accumulators + the weight vectors, within the 32 zmm registers.
LEANLM_AVX512BF16 void input_block(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, int64_t m, int64_t begin,
                                   int64_t end, float* dots) {
  switch (m) {
    case 1: rows<1, 4>(x, w, K, N, begin, end, dots); break;
    case 2: rows<2, 4>(x, w, K, N, begin, end, dots); break;
    case 3: rows<3, 4>(x, w, K, N, begin, end, dots); break;
    case 4: rows<4, 2>(x, w, K, N, begin, end, dots); break;
    case 5: rows<5, 2>(x, w, K, N, begin, end, dots); break;
    case 6: rows<6, 2>(x, w, K, N, begin, end, dots); break;
    case 7: rows<7, 2>(x, w, K, N, begin, end, dots); break;
    default: rows<8, 2>(x, w, K, N, begin, end, dots); break;
  }
}


// int8: ROWS code rows from n against M float32 input rows, 16 inputs per step.
template <int M, int ROWS>
LEANLM_AVX512 inline void int8_block(const float* x, const int8_t* w, int64_t K, int64_t n, float* dots, int64_t N) {
  __m512 acc[ROWS][M];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const bool prefetch = (n + ROWS + 1) * K + PREFETCH_BYTES <= N * K;
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const int8_t* row = w + (n + r) * K + k;
      if (prefetch && k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH_BYTES), _MM_HINT_T0);
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) dots[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M, int ROWS>
LEANLM_AVX512 void int8_rows(const float* x, const int8_t* w, int64_t K, int64_t N, int64_t begin, int64_t end, float* dots) {
  int64_t n = begin;
  for (; n + ROWS <= end; n += ROWS) int8_block<M, ROWS>(x, w, K, n, dots, N);
  for (; n < end; ++n) int8_block<M, 1>(x, w, K, n, dots, N);
}

LEANLM_AVX512 void int8_input_block(const float* x, const int8_t* w, int64_t K, int64_t N, int64_t m, int64_t begin,
                                    int64_t end, float* dots) {
  switch (m) {
    case 1: int8_rows<1, 4>(x, w, K, N, begin, end, dots); break;
    case 2: int8_rows<2, 4>(x, w, K, N, begin, end, dots); break;
    case 3: int8_rows<3, 4>(x, w, K, N, begin, end, dots); break;
    case 4: int8_rows<4, 2>(x, w, K, N, begin, end, dots); break;
    case 5: int8_rows<5, 2>(x, w, K, N, begin, end, dots); break;
    case 6: int8_rows<6, 2>(x, w, K, N, begin, end, dots); break;
    case 7: int8_rows<7, 2>(x, w, K, N, begin, end, dots); break;
    default: int8_rows<8, 2>(x, w, K, N, begin, end, dots); break;
  }
}

}  // namespace

namespace leanlm_linear {

std::atomic<bool> avx512_enabled{true};

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// x (..., K) bf16, weight (N, K) bf16 contiguous, K a multiple of 32 -> float32 dots (M, N).
std::vector<float> bf16_pair_dots(const torch::Tensor& x, const uint16_t* w, int64_t N, int64_t K) {
  const torch::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  const auto* xb = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
  std::vector<float> dots(M * N);
  at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = blk * 32, end = std::min(N, begin + 32);
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        input_block(xb + m0 * K, w, K, N, std::min<int64_t>(8, M - m0), begin, end, dots.data() + m0 * N);
    }
  });
  return dots;
}

// x rows (M, K) float32 times int8 codes (N, K), K a multiple of 16 -> float32 dots (M, N), unscaled.
std::vector<float> int8_dots(const std::vector<float>& x, const int8_t* w, int64_t N, int64_t K) {
  const int64_t M = static_cast<int64_t>(x.size()) / K;
  std::vector<float> dots(M * N);
  at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = blk * 32, end = std::min(N, begin + 32);
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        int8_input_block(x.data() + m0 * K, w, K, N, std::min<int64_t>(8, M - m0), begin, end, dots.data() + m0 * N);
    }
  });
  return dots;
}

}  // namespace leanlm_linear

// Turn the AVX-512 paths on or off (benchmarks' A/B); returns the previous setting.
bool set_avx512(bool enabled) {
  return leanlm_linear::avx512_enabled.exchange(enabled, std::memory_order_relaxed);
}

bool has_avx512_op() { return leanlm_linear::has_avx512(); }
bool has_avx512_bf16_op() { return leanlm_linear::has_avx512_bf16(); }

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("set_avx512(bool enabled) -> bool", &set_avx512);
  m.def("has_avx512() -> bool", &has_avx512_op);
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16_op);
}
