// Decode bf16 linear layers on CPUs with AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4+;
// chosen at run time, linear_small_m.cpp is the AVX2 kernel): bf16 x and W both read as bf16 pairs by vdpbf16ps
// (32 multiply-adds per instruction, float32 accumulation), instead of widening each weight to float32 and
// multiplying it into every input row with FMAs.
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

namespace {

constexpr int64_t PREFETCH_BYTES = 8192;  // as in linear_small_m.cpp

// One multiply-add step, STEP inputs wide, behind the row-blocked loop below (int8 codes: linear_int8.cpp).
struct Bf16Pairs {  // bf16 weights and bf16 inputs, multiplied as pairs
  using W = uint16_t;
  using X = uint16_t;
  using WV = __m512bh;
  using XV = __m512bh;
  static constexpr int64_t STEP = 32;
  LEANLM_AVX512BF16 static WV load_w(const W* p) { return (__m512bh)_mm512_loadu_si512(p); }
  LEANLM_AVX512BF16 static XV load_x(const X* p) { return (__m512bh)_mm512_loadu_si512(p); }
  LEANLM_AVX512BF16 static __m512 multiply_add(__m512 acc, WV w, XV x) { return _mm512_dpbf16_ps(acc, w, x); }
};

// ROWS weight rows from n against M input rows: ROWS * M float32 accumulators of 16 lanes.
template <typename F, int M, int ROWS>
LEANLM_AVX512BF16 inline void block(const typename F::X* x, const typename F::W* w, int64_t K, int64_t n, float* dots,
                                    int64_t N) {
  constexpr int64_t AHEAD = PREFETCH_BYTES / static_cast<int64_t>(sizeof(typename F::W));
  __m512 acc[ROWS][M];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const bool prefetch = (n + ROWS + 1) * K + AHEAD <= N * K;  // stays inside the weight matrix
  for (int64_t k = 0; k < K; k += F::STEP) {
    typename F::WV wv[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const typename F::W* row = w + (n + r) * K + k;
      if (prefetch && (k * static_cast<int64_t>(sizeof(typename F::W))) % 64 == 0)  // once per cache line
        _mm_prefetch(reinterpret_cast<const char*>(row + AHEAD), _MM_HINT_T0);
      wv[r] = F::load_w(row);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const typename F::XV xv = F::load_x(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) acc[r][m] = F::multiply_add(acc[r][m], wv[r], xv);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) dots[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <typename F, int M, int ROWS>
LEANLM_AVX512BF16 void rows(const typename F::X* x, const typename F::W* w, int64_t K, int64_t N, int64_t begin,
                            int64_t end, float* dots) {
  int64_t n = begin;
  for (; n + ROWS <= end; n += ROWS) block<F, M, ROWS>(x, w, K, n, dots, N);
  for (; n < end; ++n) block<F, M, 1>(x, w, K, n, dots, N);
}

// m input rows (1..8): at most 16 accumulators + the weight vectors, within the 32 zmm registers.
template <typename F>
LEANLM_AVX512BF16 void input_block(const typename F::X* x, const typename F::W* w, int64_t K, int64_t N, int64_t m,
                                   int64_t begin, int64_t end, float* dots) {
  leanlm_linear::with_row_count(m, [&](auto rows_m) {
    constexpr int M = decltype(rows_m)::value;
    rows<F, M, M <= 3 ? 4 : 2>(x, w, K, N, begin, end, dots);
  });
}

// x rows (M, K) times weight rows (N, K) -> float32 dots (M, N): 32 weight rows per task, every input row
// against them (the weights are read from memory once).
template <typename F>
std::vector<float> dots_of(const typename F::X* x, int64_t M, const typename F::W* w, int64_t N, int64_t K) {
  std::vector<float> dots(M * N);
  at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = blk * 32, end = std::min(N, begin + 32);
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        input_block<F>(x + m0 * K, w, K, N, std::min<int64_t>(8, M - m0), begin, end, dots.data() + m0 * N);
    }
  });
  return dots;
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

bool has_avx512_vnni() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

// x (..., K) bf16, weight (N, K) bf16 contiguous, K a multiple of 32 -> float32 dots (M, N).
std::vector<float> bf16_pair_dots(const torch::Tensor& x, const uint16_t* w, int64_t N, int64_t K) {
  const torch::Tensor rows = x.reshape({-1, K}).contiguous();
  const auto* xb = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
  return dots_of<Bf16Pairs>(xb, rows.size(0), w, N, K);
}

}  // namespace leanlm_linear

// Turn the AVX-512 paths on or off (benchmarks' A/B); returns the previous setting.
bool set_avx512(bool enabled) {
  return leanlm_linear::avx512_enabled.exchange(enabled, std::memory_order_relaxed);
}

bool has_avx512_op() { return leanlm_linear::has_avx512(); }
bool has_avx512_bf16_op() { return leanlm_linear::has_avx512_bf16(); }
bool has_avx512_vnni_op() { return leanlm_linear::has_avx512_vnni(); }

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("set_avx512(bool enabled) -> bool", &set_avx512);
  m.def("has_avx512() -> bool", &has_avx512_op);
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16_op);
  m.def("has_avx512_vnni() -> bool", &has_avx512_vnni_op);
}
