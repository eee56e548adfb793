// Weight-only int4 linear layers for decode: y = x @ W^T (+ bias), W[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g]
// with g = k / G (transforms/quantize/int4.py; codes (N, K/2) bytes, the even column in the low nibble).
//
// Widening 4-bit codes to float32 in registers made a 4-bit stream compute-bound on two AVX2 cores (no
// faster than ATen's int4 kernel). This is llama.cpp's approach instead (its Q4 x Q8 dots): the few input
// rows are rounded to int8 with one step dx per block of 32 inputs, and a block's sum of q * xq is done by
// integer multiply-adds (maddubs: 32 codes by 32 int8 inputs per instruction):
//   sum_k W[n, k] x_k ~= sum_b s_g(b) dx_b sum_{k in b} q_k xq_k + sum_g (z_g - 8 s_g) sum_{k in g} dx_b xq_k
// which is exactly the dequantized weights times the rounded inputs x^_k = dx_b xq_k (|x^_k - x_k| <= dx_b / 2):
// the zero-point term uses the sums of the rounded inputs too, so the error is sum_k W[n, k] (x^_k - x_k).
// Two blocks (64 inputs, 32 code bytes) go per step: the low nibbles of the 32 bytes are both blocks' even
// columns, the high nibbles their odd columns, so xq is stored in that order (permuted once per call) and
// the int32 lanes 0-3 hold block b's sums, lanes 4-7 block b + 1's; one float FMA per 64 inputs and row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "linear_io.h"

namespace {

using namespace leanlm_linear;

constexpr int64_t BLOCK = 32;  // inputs per activation step
constexpr int64_t PAIR = 2 * BLOCK;  // inputs per kernel step
constexpr int64_t PREFETCH_BYTES = 4096;  // software prefetch distance in the code stream (see linear_small_m.cpp)

// The input rows rounded to int8 per block of 32: codes in the kernel's order, each pair's steps as the
// 8 lanes it multiplies, and the sums of the rounded inputs per weight group (for the zero points).
struct Int8Rows {
  std::vector<int8_t> codes;  // (M, K): per 64 inputs, the even columns of both blocks, then the odd ones
  std::vector<float> steps;   // (M, K / 64, 8): dx of block 2p in lanes 0-3, of block 2p + 1 in lanes 4-7
  std::vector<float> group_sums;  // (M, K / G)
};

Int8Rows round_rows(const std::vector<float>& x, int64_t M, int64_t K, int64_t G) {
  Int8Rows rows{std::vector<int8_t>(M * K), std::vector<float>(M * K / PAIR * 8), std::vector<float>(M * (K / G), 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / BLOCK; ++b) {
      const float* v = x.data() + m * K + b * BLOCK;
      const auto [step, inverse] = block_step(v, BLOCK);
      // block b's even columns at bytes [h * 16, h * 16 + 16) of its pair, its odd ones 32 bytes later
      int8_t* out = rows.codes.data() + m * K + (b / 2) * PAIR + (b % 2) * 16;
      int sum = 0;
      for (int64_t i = 0; i < BLOCK / 2 && inverse != 0.f; ++i) {  // (inverse 0: zeros or a NaN, codes stay 0)
        out[i] = static_cast<int8_t>(std::nearbyint(v[2 * i] * inverse));
        out[32 + i] = static_cast<int8_t>(std::nearbyint(v[2 * i + 1] * inverse));
        sum += out[i] + out[32 + i];
      }
      std::fill_n(rows.steps.data() + (m * (K / PAIR) + b / 2) * 8 + (b % 2) * 4, 4, step);
      rows.group_sums[m * (K / G) + b * BLOCK / G] += step * static_cast<float>(sum);
    }
  return rows;
}

// Rows [m0, m0 + 8) of an Int8Rows, the ones one pass of the kernel multiplies.
struct Int8View {
  const int8_t* codes;
  const float* steps;
  const float* group_sums;
};

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(at::Half v) { return static_cast<float>(v); }

// 8 consecutive values as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

struct Int4Weight {
  const uint8_t* codes;  // (N, K / 2)
  int64_t N, K, G;
};

// The sum over a row's groups of (z - 8 s) times the rounded inputs' group sums, 8 groups at a time.
template <typename S>
inline __m256 zero_point_sums(const S* scales, const S* zeros, const float* group_sums, int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8)
    acc = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), load8(scales + g), load8(zeros + g)),
                          _mm256_loadu_ps(group_sums + g), acc);
  float tail = 0.f;
  for (; g < groups; ++g) tail += (to_float(zeros[g]) - 8.f * to_float(scales[g])) * group_sums[g];
  return _mm256_add_ps(acc, _mm256_setr_ps(tail, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f));
}

// ROWS weight rows from n against M input rows: ROWS * M float32 accumulators, one FMA per 64 inputs.
template <typename S, int M, int ROWS>
inline void block(const Int8View& x, const Int4Weight& w, const S* scales, const S* zeros, int64_t n, float* dots) {
  const int64_t K = w.K, pairs = K / PAIR, groups = K / w.G, row_bytes = K / 2;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  const bool prefetch = (n + ROWS) * row_bytes + row_bytes + PREFETCH_BYTES <= w.N * row_bytes;  // inside the matrix
  __m256 acc[ROWS][M];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m256i even[ROWS], odd[ROWS];
    __m256 scale[ROWS];  // s of block 2p in lanes 0-3, of block 2p + 1 in lanes 4-7
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const uint8_t* codes = w.codes + (n + r) * row_bytes + p * 32;
      if (prefetch && p % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + PREFETCH_BYTES), _MM_HINT_T0);
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
      even[r] = _mm256_and_si256(bytes, low);
      odd[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      const S* s = scales + (n + r) * groups + (2 * p * BLOCK) / w.G;
      scale[r] = w.G == BLOCK ? _mm256_set_m128(_mm_set1_ps(to_float(s[1])), _mm_set1_ps(to_float(s[0])))
                              : _mm256_set1_ps(to_float(s[0]));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const int8_t* xq = x.codes + m * K + p * PAIR;
      const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      const __m256 dx = _mm256_loadu_ps(x.steps + (m * pairs + p) * 8);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        // int16 pair sums <= 2 * 15 * 127 each, so the two halves add without saturating
        const __m256i pairs16 = _mm256_add_epi16(_mm256_maddubs_epi16(even[r], x_even), _mm256_maddubs_epi16(odd[r], x_odd));
        const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs16, ones));
        acc[r][m] = _mm256_fmadd_ps(_mm256_mul_ps(sums, dx), scale[r], acc[r][m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 zero = zero_point_sums(scales + (n + r) * groups, zeros + (n + r) * groups, x.group_sums + m * groups, groups);
      dots[m * w.N + n + r] = horizontal_sum(_mm256_add_ps(acc[r][m], zero));
    }
}

template <typename S, int M, int ROWS>
void rows(const Int8View& x, const Int4Weight& w, const S* scales, const S* zeros, int64_t begin, int64_t end, float* dots) {
  int64_t n = begin;
  for (; n + ROWS <= end; n += ROWS) block<S, M, ROWS>(x, w, scales, zeros, n, dots);
  for (; n < end; ++n) block<S, M, 1>(x, w, scales, zeros, n, dots);
}

// m input rows (1..8) of x: accumulators, codes and scales stay within 16 registers where they can.
template <typename S>
void input_block(const Int8View& x, const Int4Weight& w, const S* scales, const S* zeros, int64_t m, int64_t begin,
                 int64_t end, float* dots) {
  with_row_count(m, [&](auto rows_m) {
    constexpr int M = decltype(rows_m)::value;
    rows<S, M, M == 1 ? 3 : (M <= 3 ? 2 : 1)>(x, w, scales, zeros, begin, end, dots);
  });
}

template <typename S>
std::vector<float> int4_dots(const std::vector<float>& xf, int64_t M, const Int4Weight& w, const S* scales, const S* zeros) {
  const Int8Rows all = round_rows(xf, M, w.K, w.G);
  std::vector<float> dots(M * w.N);
  // 32 weight rows per task (9 KB of codes at K = 576), every input row against them: the codes are read
  // from memory once, the int8 rows stay in L1.
  at::parallel_for(0, (w.N + 31) / 32, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk)
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const Int8View x{all.codes.data() + m0 * w.K, all.steps.data() + m0 * (w.K / PAIR) * 8,
                         all.group_sums.data() + m0 * (w.K / w.G)};
        input_block<S>(x, w, scales, zeros, std::min<int64_t>(8, M - m0), blk * 32, std::min(w.N, blk * 32 + 32),
                       dots.data() + m0 * w.N);
      }
  });
  return dots;
}

}  // namespace

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                          int64_t group_size, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous(),
              "codes must be a contiguous 2-D uint8 tensor");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, the weight ", K);
  // a step covers 64 inputs: one group of 32 per half, or one group (of a multiple of 64) for both halves
  TORCH_CHECK((group_size == BLOCK || (group_size > 0 && group_size % PAIR == 0)) && K % group_size == 0 && K % PAIR == 0,
              "group size ", group_size, " must be 32 or a multiple of 64 that divides in_features ", K,
              ", and in_features a multiple of 64");
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.numel() == N * (K / group_size) && scales.is_contiguous() &&
              zeros.is_contiguous() && scales.scalar_type() == zeros.scalar_type(),
              "scales and zeros must be contiguous (out, in / group) tensors of one dtype");
  const std::vector<float> xf = float_rows(x, K);
  const int64_t M = static_cast<int64_t>(xf.size()) / K;
  const Int4Weight w{codes.data_ptr<uint8_t>(), N, K, group_size};
  std::vector<float> dots;
  switch (scales.scalar_type()) {
    case torch::kFloat32: dots = int4_dots(xf, M, w, scales.data_ptr<float>(), zeros.data_ptr<float>()); break;
    case torch::kBFloat16: dots = int4_dots(xf, M, w, scales.data_ptr<at::BFloat16>(), zeros.data_ptr<at::BFloat16>()); break;
    case torch::kHalf: dots = int4_dots(xf, M, w, scales.data_ptr<at::Half>(), zeros.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "scales must be float32, bfloat16 or float16");
  }
  return finish_rows(x, dots, M, N, {}, optional_floats(bias, N, "bias"));
}

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("linear_int4(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("linear_int4", &linear_int4); }
