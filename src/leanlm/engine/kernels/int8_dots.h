// Integer dot products over packed 2- and 4-bit KV codes (quantized_attention.cpp), the way llama.cpp
// multiplies its quantized weights: the float32 side (a query's q * s per key group, or the softmax
// weights p * s of a block of value tokens) is rounded to int8 with one step per 16 factors, and
// _mm256_maddubs_epi16 multiplies 32 unsigned codes by 32 int8 factors and adds neighbouring pairs
// in one instruction; the float FMA path does 8 multiply-adds per instruction and must first widen
// each code to float32. At 16K tokens the attention over a 4.5x smaller cache is bound by that
// arithmetic, not by reading the codes.
//
// Two packed rows (two key channels, or two value tokens) are interleaved byte by byte, so each pair
// of bytes a maddubs adds holds the same token (keys: channels d, d+1) or the same channel (values:
// tokens l, l+1); the plane of a BITS-bit code is a shift and a byte mask (quant.pack's layout).
// Each block of 16 factors has its own step (its largest magnitude / 127), so the rounding error is at most
// half a step per factor, on top of the codes' own; the int16 block sums are scaled into float32.
#pragma once
#include <immintrin.h>

#include <cfloat>
#include <cstdint>

namespace leanlm_attention {

constexpr int64_t INT8_CHUNK = 16;  // bytes of each row per pass (a row's byte count must be a multiple)
// Factors per int8 step: 16 (8 pairs of rows). A step per 16 channels keeps an outlier key channel from
// coarsening every other channel's factor, and a step per 16 tokens a dominant token (an attention sink)
// every other token's weight; int16 sums of 8 pairs cannot overflow (8 * 2 * 15 * 127 < 32767).
constexpr int64_t INT8_BLOCK = 16;

// bytes [c, c + 16) of two rows, interleaved: byte 2k is row0[c + k], byte 2k + 1 is row1[c + k]
inline __m256i interleave16(const uint8_t* row0, const uint8_t* row1) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row0));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row1));
  return _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
}

template <int BITS>
inline __m256i plane_bytes(__m256i bytes, int plane) {  // code plane `plane` of every byte, as uint8
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  return _mm256_and_si256(plane ? _mm256_srli_epi16(bytes, plane * BITS) : bytes, mask);
}

inline float abs_max16(const float* x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 top = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x)), _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// x (n floats, n a multiple of 16) → int8 factors, x_i ≈ factor_i * steps[i / 16], written as n bytes
// (read back as n / 2 int16 words: factor 2i in the low byte, 2i + 1 in the high one). Returns the sum of
// the rounding residuals x_i - factor_i * step: a caller adds it times the codes' midpoint back, so only
// the residuals times (code - midpoint) remain as error (codes are unsigned: half the error of code * r).
inline float to_int8(const float* x, int64_t n, int16_t* pairs, float* steps) {
  auto* out = reinterpret_cast<int8_t*>(pairs);
  __m256 residual = _mm256_setzero_ps();
  for (int64_t b = 0; b < n; b += INT8_BLOCK) {
    const float top = abs_max16(x + b), step = top > 127.f * FLT_MIN ? top / 127.f : 1.f;  // 1/step finite
    steps[b / INT8_BLOCK] = step;
    const __m256 inverse = _mm256_set1_ps(1.f / step), step8 = _mm256_set1_ps(step);
    for (int64_t i = b; i < b + INT8_BLOCK; i += 8) {
      const __m256 xi = _mm256_loadu_ps(x + i);
      const __m256i whole = _mm256_cvtps_epi32(_mm256_mul_ps(xi, inverse));  // round to nearest
      residual = _mm256_add_ps(residual, _mm256_fnmadd_ps(_mm256_cvtepi32_ps(whole), step8, xi));
      const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(whole), _mm256_extracti128_si256(whole, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packs_epi16(words, words));
    }
  }
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(residual), _mm256_extractf128_ps(residual, 1));
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(_mm_hadd_ps(r, r));
}

template <int BITS>
constexpr float code_midpoint() { return ((1 << BITS) - 1) / 2.f; }

// Sums over rows (channels or tokens) [0, 2 * pair_count) of GH heads' int8 factors times the codes of
// one 16-byte chunk of each row (rows `stride` bytes apart from `first`), in float32 per plane and head:
// acc[plane][head][half] (half 0: bytes c..c+7 of the chunk, 1: c+8..c+15). steps: pair_count / 8 per head.
template <int BITS, int GH>
inline void chunk_sums(const int16_t* pairs, const float* steps, int64_t pair_count, const uint8_t* first,
                       int64_t stride, __m256 (&acc)[8 / BITS][GH][2]) {
  constexpr int PLANES = 8 / BITS, PAIRS = INT8_BLOCK / 2;
  const int64_t blocks = pair_count / PAIRS;
#pragma GCC unroll 4
  for (int p = 0; p < PLANES; ++p)
#pragma GCC unroll 8
    for (int g = 0; g < GH; ++g) acc[p][g][0] = acc[p][g][1] = _mm256_setzero_ps();
  for (int64_t block = 0; block < blocks; ++block) {
    __m256i sums[PLANES][GH];
#pragma GCC unroll 4
    for (int p = 0; p < PLANES; ++p)
#pragma GCC unroll 8
      for (int g = 0; g < GH; ++g) sums[p][g] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int64_t i = block * PAIRS; i < (block + 1) * PAIRS; ++i) {
      const __m256i bytes = interleave16(first + 2 * i * stride, first + (2 * i + 1) * stride);
#pragma GCC unroll 4
      for (int p = 0; p < PLANES; ++p) {
        const __m256i codes = plane_bytes<BITS>(bytes, p);
#pragma GCC unroll 8
        for (int g = 0; g < GH; ++g)
          sums[p][g] = _mm256_add_epi16(sums[p][g], _mm256_maddubs_epi16(codes, _mm256_set1_epi16(pairs[g * pair_count + i])));
      }
    }
#pragma GCC unroll 4
    for (int p = 0; p < PLANES; ++p)
#pragma GCC unroll 8
      for (int g = 0; g < GH; ++g) {
        const __m256 step = _mm256_set1_ps(steps[g * blocks + block]);
        const __m128i low = _mm256_castsi256_si128(sums[p][g]), high = _mm256_extracti128_si256(sums[p][g], 1);
        acc[p][g][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(low)), step, acc[p][g][0]);
        acc[p][g][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(high)), step, acc[p][g][1]);
      }
  }
}

// sum over `rows` packed rows (rows `stride` bytes apart from `codes`, row_bytes bytes each; plane p,
// byte c: output column p * row_bytes + c) of GH heads' int8 factors (pairs: GH x rows/2, steps: GH x
// rows/16) times the codes, written to out[g * head_stride + column] + bias[g], or added onto out when
// bias is null. Keys per channel: the rows are one key group's channels and the columns its tokens
// (scores); values per token: the rows are tokens and the columns one value group's channels (sums).
template <int BITS, int GH>
void int8_row_dots(const int16_t* pairs, const float* steps, int64_t rows, const uint8_t* codes, int64_t stride,
                   int64_t row_bytes, float* out, int64_t head_stride, const float* bias) {
  constexpr int PLANES = 8 / BITS;
  for (int64_t c = 0; c < row_bytes; c += INT8_CHUNK) {
    __m256 acc[PLANES][GH][2];
    chunk_sums<BITS, GH>(pairs, steps, rows / 2, codes + c, stride, acc);
    for (int p = 0; p < PLANES; ++p)
      for (int g = 0; g < GH; ++g) {
        float* o = out + g * head_stride + p * row_bytes + c;
        const __m256 low = bias ? _mm256_set1_ps(bias[g]) : _mm256_loadu_ps(o);
        const __m256 high = bias ? low : _mm256_loadu_ps(o + 8);
        _mm256_storeu_ps(o, _mm256_add_ps(acc[p][g][0], low));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(acc[p][g][1], high));
      }
  }
}

}  // namespace leanlm_attention
