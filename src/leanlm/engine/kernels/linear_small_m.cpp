// Weight-streaming bf16 linear layers for decode: y = x @ W^T (+ bias) with few input rows (1-16 tokens).
//
// PyTorch's CPU bf16 matmul on machines without AVX512-BF16 converts through a slow path: a batch-1
// step of SmolLM2-135M read its weights at ~4.7 GB/s on one core (the core reads ~12 GB/s), and at 4
// rows it took 4x longer than at 1. Decoding is a stream over the weights, so this kernel reads each
// weight row once, widens it to float32 in registers (bf16 = the top 16 bits of a float32) and
// multiplies it into every input row held in L1: the time is the weight bytes over the memory
// bandwidth until the rows make it compute-bound. (int8 codes: linear_int8.cpp.)
// Accumulation is float32; the result is rounded to the input's dtype once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "linear_io.h"

namespace {

using namespace leanlm_linear;

// Software prefetch this far ahead in the weight stream: the hardware prefetchers alone left a cold decode
// step's small matrices (k/v projections, 110 KB per thread) at 7-14 GB/s of the ~20 GB/s two cores read;
// with it, int8 MLP matrices 7.4 -> 13.5 GB/s, bf16 13.8 -> 17.3 GB/s, the output head 16 -> 20 GB/s.
constexpr int64_t PREFETCH_BYTES = 8192;

inline __m256 widen_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// ROWS weight rows against M input rows, each dot product split over SPLIT accumulators along K:
// ROWS*M*SPLIT independent float32 accumulators stay in registers and hide the FMA latency.
template <int M, int ROWS, int SPLIT>
inline void block(const float* x, const uint16_t* w, int64_t K, int64_t n, float* dots, int64_t N) {
  __m256 acc[ROWS][M][SPLIT];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int s = 0; s < SPLIT; ++s) acc[r][m][s] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8 * SPLIT) {
    constexpr int64_t AHEAD = PREFETCH_BYTES / 2;
    if ((n + ROWS) * K + k + AHEAD <= N * K)  // inside the weight matrix (the stream runs on into the next rows)
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * K + k + AHEAD), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int s = 0; s < SPLIT; ++s) {
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const __m256 wv = widen_bf16(w + (n + r) * K + k + 8 * s);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          acc[r][m][s] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * s), acc[r][m][s]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      __m256 total = acc[r][m][0];
#pragma GCC unroll 4
      for (int s = 1; s < SPLIT; ++s) total = _mm256_add_ps(total, acc[r][m][s]);
      dots[m * N + n + r] = horizontal_sum(total);
    }
}

// Weight rows [begin, end) against M input rows (ROWS at a time, then one at a time).
template <int M, int ROWS, int SPLIT>
void rows(const float* x, const uint16_t* w, int64_t K, int64_t N, int64_t begin, int64_t end, float* dots) {
  int64_t n = begin;
  if (K % (8 * SPLIT) != 0) {  // K is a multiple of 8 but not of the split: one accumulator per dot
    for (; n + ROWS <= end; n += ROWS) block<M, ROWS, 1>(x, w, K, n, dots, N);
  } else {
    for (; n + ROWS <= end; n += ROWS) block<M, ROWS, SPLIT>(x, w, K, n, dots, N);
  }
  for (; n < end; ++n) block<M, 1, 1>(x, w, K, n, dots, N);
}

// Input rows per pass over a block of weight rows: 3 rows x 4 accumulators + the widened weights fit in 16
// registers. Every row's dot products are summed the same way (4 accumulators along K, whatever the row count),
// so a row's result does not depend on the rows beside it: a chain of tokens verified in one call (speculative
// decoding) gets bit for bit what one-token calls get. (Before, 5-8 rows took 1 accumulator each: one pass, but
// other sums; measured AVX2 step times in README "Speculative decoding".)
constexpr int64_t ROWS_PER_PASS = 3;

void input_block(const float* x, const uint16_t* w, int64_t K, int64_t N, int64_t m, int64_t begin, int64_t end, float* dots) {
  with_row_count(m, [&](auto rows_m) {  // m is 1..ROWS_PER_PASS
    constexpr int M = decltype(rows_m)::value;
    if constexpr (M <= ROWS_PER_PASS) rows<M, 1, 4>(x, w, K, N, begin, end, dots);
  });
}

torch::Tensor linear(const torch::Tensor& x, const uint16_t* w, int64_t N, int64_t K, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(K % 8 == 0, "in_features must be a multiple of 8, got ", K);
  const std::vector<float> xf = float_rows(x, K);
  const int64_t M = static_cast<int64_t>(xf.size()) / K;
  std::vector<float> dots(M * N);
  // 32 weight rows per task (~37 KB of bf16 at K=576): the input rows stay in L1, the block in L2.
  at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t begin = blk * 32, end = std::min(N, begin + 32);
      for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_PASS)
        input_block(xf.data() + m0 * K, w, K, N, std::min(ROWS_PER_PASS, M - m0), begin, end, dots.data() + m0 * N);
    }
  });
  return finish_rows(x, dots, M, N, {}, optional_floats(bias, N, "bias"));
}

}  // namespace

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous 2-D bfloat16 tensor");
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const int64_t N = weight.size(0), K = weight.size(1);
  if (x.scalar_type() == torch::kBFloat16 && x.size(-1) == K && K % 32 == 0 && avx512_enabled.load(std::memory_order_relaxed) &&
      has_avx512_bf16()) {  // bf16 pairs multiplied as they are (linear_avx512.cpp)
    return finish_rows(x, bf16_pair_dots(x, w, N, K), x.numel() / K, N, {}, optional_floats(bias, N, "bias"));
  }
  return linear(x, w, N, K, bias);
}

// Registered in C++ (not through a Python custom op): a decode step makes ~200 of these calls, and
// the Python dispatch layer cost ~15 us each. The fake (meta) kernels for torch.compile are in Python.
TORCH_LIBRARY(leanlm, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("linear_bf16", &linear_bf16); }
