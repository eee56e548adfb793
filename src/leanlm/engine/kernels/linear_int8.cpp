// Weight-only int8 linear layers for decode: y = (x^ @ Q^T) * row_scale (+ bias), Q (N, K) int8 codes in
// [-127, 127] (transforms/quantize/int8.py), x^ the input rows rounded to int8 per block of 32 inputs (step
// max|x| / 127): llama.cpp's Q8_0 x Q8_0 dot products, with the weight's one scale per row.
//
// Widening every code to float32 and multiplying it into float rows made int8 compute-bound: on an AVX-512
// Xeon a batch-1 step streamed its int8 weights at ~17 GB/s, where bf16 streams ~23 GB/s. Integer multiply-adds
// take 64 codes per instruction (AVX512-VNNI) or 32 (AVX2), and the float work is one convert + FMA per block.
// - AVX512-VNNI: vpdpbusd multiplies unsigned by signed bytes and adds each 4 products into an int32 lane. The
//   codes become unsigned as q + 128 (one xor per 64 codes, shared by every input row), and each lane starts at
//   -128 * the sum of its 4 rounded inputs, so the lanes hold sum q * xq exactly.
// - AVX2: maddubs (unsigned x signed bytes, pairs added in int16) on |q| and xq carrying q's sign, as llama.cpp
//   does: |q| * |xq| <= 127 * 127, so a pair's sum fits int16; madd with ones adds pairs into int32 lanes.
// Both paths compute each block's sum exactly, then scale it by the block's step in float32, so they differ
// only in the order of the float additions. The result is exactly the dequantized weights times the rounded
// inputs (up to that float32 accumulation): |x^_k - x_k| <= step / 2.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "linear_io.h"

#define LEANLM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace {

using namespace leanlm_linear;

constexpr int64_t BLOCK = 32;  // inputs per rounding step
constexpr int64_t PREFETCH_BYTES = 8192;  // as in linear_small_m.cpp

// The input rows rounded to int8, with what each path needs per int32 lane of its dot products (4 inputs).
struct RoundedRows {
  std::vector<int8_t> codes;      // (M, K): x_k ~= codes_k * step of k's block
  std::vector<float> lane_steps;  // (M, K / 4): each block's step, once per lane (8 lanes a block)
  std::vector<int32_t> offsets;   // (M, K / 4): -128 * the sum of each lane's 4 codes (the VNNI path's q + 128)
};

// One block of 32 inputs rounded to int8 (x * inverse to the nearest integer, ties to even: the default MXCSR
// mode of cvtps2dq, as nearbyint), and -128 * the sum of each 4 codes.
inline void round_block(const float* v, float inverse, int8_t* codes, int32_t* offsets) {
  const __m256 by = _mm256_set1_ps(inverse);
  __m256i r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), by));
  // saturating packs interleave the 128-bit halves: 4-byte groups come out as r0 lo, r1 lo, r2 lo, r3 lo, r0 hi, ...
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  const __m256i bytes = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), bytes);
  const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes), _mm256_set1_epi16(1));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets), _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 7)));
}

RoundedRows round_rows(const std::vector<float>& x, int64_t M, int64_t K) {
  RoundedRows rows{std::vector<int8_t>(M * K), std::vector<float>(M * K / 4), std::vector<int32_t>(M * K / 4)};
  for (int64_t b = 0; b < M * K / BLOCK; ++b) {  // blocks never straddle rows: K % 32 == 0
    const BlockStep s = block_step(x.data() + b * BLOCK, BLOCK);
    round_block(x.data() + b * BLOCK, s.inverse, rows.codes.data() + b * BLOCK, rows.offsets.data() + b * BLOCK / 4);
    std::fill_n(rows.lane_steps.data() + b * BLOCK / 4, BLOCK / 4, s.step);
  }
  return rows;
}

struct Int8Weight {
  const int8_t* codes;  // (N, K)
  int64_t N, K;
};

// AVX512-VNNI: 64 inputs a step (the last step of K % 64 == 32 loads half, the rest masked to zero).
struct Vnni {
  static constexpr int64_t STEP = 64;
  template <int M, int ROWS>
  LEANLM_VNNI static void block(const RoundedRows& x, int64_t m0, const Int8Weight& w, int64_t n, float* dots) {
    const int64_t K = w.K;
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    const bool prefetch = (n + ROWS + 1) * K + PREFETCH_BYTES <= w.N * K;  // stays inside the weight matrix
    __m512 acc[ROWS][M];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += STEP) {
      const __mmask64 bytes = k + STEP <= K ? ~0ULL : 0xFFFFFFFFULL;
      const __mmask16 lanes = k + STEP <= K ? 0xFFFF : 0x00FF;
      __m512i q[ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const int8_t* row = w.codes + (n + r) * K + k;
        if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH_BYTES), _MM_HINT_T0);
        q[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, row), offset);  // q + 128 as unsigned bytes
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const int64_t at = (m0 + m) * K + k;
        const __m512i xq = _mm512_maskz_loadu_epi8(bytes, x.codes.data() + at);
        const __m512i start = _mm512_maskz_loadu_epi32(lanes, x.offsets.data() + at / 4);
        const __m512 step = _mm512_maskz_loadu_ps(lanes, x.lane_steps.data() + at / 4);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r)
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, q[r], xq)), step, acc[r][m]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) dots[m * w.N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
  // m input rows (1..8): at most 16 accumulators + the code vectors, within the 32 zmm registers
  static constexpr int rows_per_block(int m) { return m <= 3 ? 4 : 2; }
};

// AVX2: 32 inputs (one block) a step.
struct Avx2 {
  static constexpr int64_t STEP = 32;
  template <int M, int ROWS>
  static void block(const RoundedRows& x, int64_t m0, const Int8Weight& w, int64_t n, float* dots) {
    const int64_t K = w.K;
    const __m256i ones = _mm256_set1_epi16(1);
    const bool prefetch = (n + ROWS + 1) * K + PREFETCH_BYTES <= w.N * K;
    __m256 acc[ROWS][M];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += STEP) {
      __m256i q[ROWS], magnitude[ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const int8_t* row = w.codes + (n + r) * K + k;
        if (prefetch && k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH_BYTES), _MM_HINT_T0);
        q[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        magnitude[r] = _mm256_sign_epi8(q[r], q[r]);  // |q| as unsigned bytes
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const int64_t at = (m0 + m) * K + k;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes.data() + at));
        const __m256 step = _mm256_loadu_ps(x.lane_steps.data() + at / 4);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude[r], _mm256_sign_epi8(xq, q[r]));  // |q| * sign(q) xq
          const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
          acc[r][m] = _mm256_fmadd_ps(sums, step, acc[r][m]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) dots[m * w.N + n + r] = horizontal_sum(acc[r][m]);
  }
  // within 16 ymm registers: accumulators, the codes and their magnitudes
  static constexpr int rows_per_block(int m) { return m <= 2 ? 2 : 1; }
};

// Weight rows [begin, end) against input rows [m0, m0 + M), ROWS at a time, then one at a time.
template <typename P, int M, int ROWS>
void rows(const RoundedRows& x, int64_t m0, const Int8Weight& w, int64_t begin, int64_t end, float* dots) {
  int64_t n = begin;
  for (; n + ROWS <= end; n += ROWS) P::template block<M, ROWS>(x, m0, w, n, dots);
  for (; n < end; ++n) P::template block<M, 1>(x, m0, w, n, dots);
}

template <typename P>
void input_block(const RoundedRows& x, int64_t m0, int64_t m, const Int8Weight& w, int64_t begin, int64_t end,
                 float* dots) {
  with_row_count(m, [&](auto rows_m) {
    constexpr int M = decltype(rows_m)::value;
    rows<P, M, P::rows_per_block(M)>(x, m0, w, begin, end, dots);
  });
}

// 32 weight rows per task (18 KB of codes at K = 576), every input row against them: the codes are read from
// memory once, the rounded rows stay in L1.
template <typename P>
std::vector<float> int8_dots(const RoundedRows& x, int64_t M, const Int8Weight& w) {
  std::vector<float> dots(M * w.N);
  at::parallel_for(0, (w.N + 31) / 32, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk)
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        input_block<P>(x, m0, std::min<int64_t>(8, M - m0), w, blk * 32, std::min(w.N, blk * 32 + 32),
                       dots.data() + m0 * w.N);
  });
  return dots;
}

}  // namespace

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.dim() == 2 && codes.is_contiguous(),
              "codes must be a contiguous 2-D int8 tensor");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(K % BLOCK == 0, "in_features must be a multiple of 32, got ", K);
  const std::vector<float> xf = float_rows(x, K);
  const int64_t M = static_cast<int64_t>(xf.size()) / K;
  const RoundedRows rounded = round_rows(xf, M, K);
  const Int8Weight w{codes.data_ptr<int8_t>(), N, K};
  const bool vnni = avx512_enabled.load(std::memory_order_relaxed) && has_avx512_vnni();
  const std::vector<float> dots = vnni ? int8_dots<Vnni>(rounded, M, w) : int8_dots<Avx2>(rounded, M, w);
  return finish_rows(x, dots, M, N, optional_floats(row_scale, N, "row_scale"), optional_floats(bias, N, "bias"));
}

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("linear_int8(Tensor x, Tensor codes, Tensor row_scale, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("linear_int8", &linear_int8); }
