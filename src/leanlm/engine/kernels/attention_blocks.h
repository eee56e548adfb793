// Blocks shared by the decode attention kernels (decode_attention.cpp, quantized_attention.cpp):
// bf16/float32 loads widened to float32 registers, and the score and value passes of one KV head's
// query heads over a range of full-precision cache slots.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace leanlm_attention {

constexpr int64_t BLOCK = 64;  // cache slots per task: 8 KB of bf16 keys at head_dim 64

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}

// scores[g, l] = scale * q[g] . keys[l] for GROUPS query heads of one KV head and SLOTS slots at a
// time: each 8-column chunk of a key row is widened once and multiplied into every head's register
// accumulator (at 16K slots this pass is compute-bound, not memory-bound, without that sharing).
template <typename KV, int GROUPS, int SLOTS>
inline void score_slots(const float* q, const KV* keys, int64_t D, int64_t l, float scale, float* scores, int64_t length) {
  __m256 acc[SLOTS][GROUPS];
#pragma GCC unroll 4
  for (int s = 0; s < SLOTS; ++s)
#pragma GCC unroll 8
    for (int g = 0; g < GROUPS; ++g) acc[s][g] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 k[SLOTS];
#pragma GCC unroll 4
    for (int s = 0; s < SLOTS; ++s) k[s] = load8(keys + (l + s) * D + d);
#pragma GCC unroll 8
    for (int g = 0; g < GROUPS; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + g * D + d);
#pragma GCC unroll 4
      for (int s = 0; s < SLOTS; ++s) acc[s][g] = _mm256_fmadd_ps(k[s], qv, acc[s][g]);
    }
  }
#pragma GCC unroll 4
  for (int s = 0; s < SLOTS; ++s)
#pragma GCC unroll 8
    for (int g = 0; g < GROUPS; ++g) scores[g * length + l + s] = hsum(acc[s][g]) * scale;
}

template <typename KV, int GROUPS>
void score_group(const float* q, const KV* keys, int64_t D, int64_t l0, int64_t l1, float scale, float* scores,
                 int64_t length) {
  constexpr int SLOTS = GROUPS <= 3 ? 4 : (GROUPS <= 6 ? 2 : 1);  // SLOTS x GROUPS accumulators in 16 registers
  int64_t l = l0;
  for (; l + SLOTS <= l1; l += SLOTS) score_slots<KV, GROUPS, SLOTS>(q, keys, D, l, scale, scores, length);
  for (; l < l1; ++l) score_slots<KV, GROUPS, 1>(q, keys, D, l, scale, scores, length);
}

template <typename KV>
void score_block(const float* q, const KV* keys, int64_t D, int64_t G, int64_t l0, int64_t l1, float scale,
                 const uint8_t* keep, float* scores, int64_t length) {
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const float* qg = q + g0 * D;
    float* sg = scores + g0 * length;
    switch (std::min<int64_t>(8, G - g0)) {
      case 1: score_group<KV, 1>(qg, keys, D, l0, l1, scale, sg, length); break;
      case 2: score_group<KV, 2>(qg, keys, D, l0, l1, scale, sg, length); break;
      case 3: score_group<KV, 3>(qg, keys, D, l0, l1, scale, sg, length); break;
      case 4: score_group<KV, 4>(qg, keys, D, l0, l1, scale, sg, length); break;
      case 5: score_group<KV, 5>(qg, keys, D, l0, l1, scale, sg, length); break;
      case 6: score_group<KV, 6>(qg, keys, D, l0, l1, scale, sg, length); break;
      case 7: score_group<KV, 7>(qg, keys, D, l0, l1, scale, sg, length); break;
      default: score_group<KV, 8>(qg, keys, D, l0, l1, scale, sg, length); break;
    }
  }
  if (keep == nullptr) return;
  for (int64_t l = l0; l < l1; ++l)  // pads of a left-padded row
    if (keep[l] == 0)
      for (int64_t g = 0; g < G; ++g) scores[g * length + l] = -std::numeric_limits<float>::infinity();
}

// out[g] = sum over slots [l0, l1) of p[g, l] * values[l] (out: G x D float32). Column-major over the
// head dim: 8 columns at a time, one register accumulator per query head (up to MAX_GROUP of them),
// so the block's value rows (L1-resident: 8 KB at 64 slots) are read once per 8 columns.
constexpr int64_t MAX_GROUP = 8;

// Independent accumulator chains per query head: one FMA chain per register would wait on the FMA
// latency (4 cycles) every step, so U rows (or slots) go to U separate chains, summed at the end.
template <int GH>
constexpr int chains() { return GH <= 3 ? 4 : (GH <= 6 ? 2 : 1); }

template <int U, int GH>
inline void zero_chains(__m256 (&acc)[U][GH]) {
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int g = 0; g < GH; ++g) acc[u][g] = _mm256_setzero_ps();
}

// start + the U chains of head g
template <int U, int GH>
inline __m256 sum_chains(const __m256 (&acc)[U][GH], int g, __m256 start) {
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) start = _mm256_add_ps(start, acc[u][g]);
  return start;
}

template <typename KV, int GROUPS>
void value_columns(const float* p, const KV* values, int64_t D, int64_t l0, int64_t l1, int64_t length, float* out) {
  constexpr int U = chains<GROUPS>();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 acc[U][GROUPS];
    zero_chains(acc);
    int64_t l = l0;
    for (; l + U <= l1; l += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m256 row = load8(values + (l + u) * D + d);
#pragma GCC unroll 8
        for (int g = 0; g < GROUPS; ++g)
          acc[u][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * length + l + u), row, acc[u][g]);
      }
    }
    for (; l < l1; ++l) {
      const __m256 row = load8(values + l * D + d);
#pragma GCC unroll 8
      for (int g = 0; g < GROUPS; ++g) acc[0][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * length + l), row, acc[0][g]);
    }
#pragma GCC unroll 8
    for (int g = 0; g < GROUPS; ++g) _mm256_storeu_ps(out + g * D + d, sum_chains(acc, g, _mm256_setzero_ps()));
  }
}

template <typename KV>
void value_block(const float* p, const KV* values, int64_t D, int64_t G, int64_t l0, int64_t l1, int64_t length,
                 float* out) {
  for (int64_t g0 = 0; g0 < G; g0 += MAX_GROUP) {  // register accumulators for up to 8 query heads at a time
    const float* pg = p + g0 * length;
    float* og = out + g0 * D;
    switch (std::min(MAX_GROUP, G - g0)) {
      case 1: value_columns<KV, 1>(pg, values, D, l0, l1, length, og); break;
      case 2: value_columns<KV, 2>(pg, values, D, l0, l1, length, og); break;
      case 3: value_columns<KV, 3>(pg, values, D, l0, l1, length, og); break;
      case 4: value_columns<KV, 4>(pg, values, D, l0, l1, length, og); break;
      case 5: value_columns<KV, 5>(pg, values, D, l0, l1, length, og); break;
      case 6: value_columns<KV, 6>(pg, values, D, l0, l1, length, og); break;
      case 7: value_columns<KV, 7>(pg, values, D, l0, l1, length, og); break;
      default: value_columns<KV, 8>(pg, values, D, l0, l1, length, og); break;
    }
  }
}

// A thread's scratch buffer of at least n floats (kept across calls: no allocation per block).
inline std::vector<float>& scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer;
}

// exp(x) for 8 floats (Cephes' polynomial, as in avx_mathfun; relative error ~1e-7 for x in [-88, 88]).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// x[0, n) -> exp(x - max x) in place; returns (max, sum of the exponentials).
inline std::pair<float, float> exp_against_max(float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= 8) {  // vector max: a scalar loop waits on each comparison
    __m256 top8 = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top8);
    top = *std::max_element(lanes, lanes + 8);
  }
  for (; i < n; ++i) top = std::max(top, x[i]);
  if (top == -std::numeric_limits<float>::infinity()) {  // every slot masked (pads): weight 0, no NaN
    std::fill(x, x + n, 0.f);
    return {top, 0.f};
  }
  __m256 total = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(top)));
    _mm256_storeu_ps(x + i, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = hsum(total);
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - top));
  return {top, sum};
}

// partial (heads_kv, blocks, G, D + 2): each block's value sums, max and sum of exponentials. Joins
// them per query head (weights exp(block max - overall max), over the total): blocks before `tail_from`
// into `main`, the others into `tail` (a quantized cache's residual, in another basis), or all into
// `main` when tail is null.
inline void join_blocks(const float* partial, int64_t heads_kv, int64_t blocks, int64_t G, int64_t D, float* main,
                        float* tail, int64_t tail_from) {
  at::parallel_for(0, heads_kv * G, 1, [&](int64_t first, int64_t last) {
    for (int64_t hg = first; hg < last; ++hg) {
      const int64_t bh = hg / G, g = hg % G;
      const float* row = partial + (bh * blocks * G + g) * (D + 2);  // block k at row + k * G * (D + 2)
      float top = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t k = 0; k < blocks; ++k) top = std::max(top, row[k * G * (D + 2) + D]);
      float* main_out = main + hg * D;
      float* tail_out = tail == nullptr ? nullptr : tail + hg * D;
      std::fill(main_out, main_out + D, 0.f);
      if (tail_out != nullptr) std::fill(tail_out, tail_out + D, 0.f);
      for (int64_t k = 0; k < blocks; ++k) {
        const float* block = row + k * G * (D + 2);
        const float w = std::exp(block[D] - top);
        total += w * block[D + 1];
        float* out = (tail_out != nullptr && k >= tail_from) ? tail_out : main_out;
        for (int64_t d = 0; d < D; ++d) out[d] += w * block[d];
      }
      for (int64_t d = 0; d < D; ++d) main_out[d] /= total;
      if (tail_out != nullptr)
        for (int64_t d = 0; d < D; ++d) tail_out[d] /= total;
    }
  });
}

// ps[l] = p[l] * s[l * stride] for l < n; returns sum_l p[l] * z[l * stride] (vectorised for stride 1:
// a scalar loop here cost as much as the value sums themselves).
inline float scale_weights(const float* p, const float* s, const float* z, int64_t stride, int64_t n, float* ps) {
  int64_t l = 0;
  __m256 total = _mm256_setzero_ps();
  if (stride == 1)
    for (; l + 8 <= n; l += 8) {
      const __m256 pl = _mm256_loadu_ps(p + l);
      _mm256_storeu_ps(ps + l, _mm256_mul_ps(pl, _mm256_loadu_ps(s + l)));
      total = _mm256_fmadd_ps(pl, _mm256_loadu_ps(z + l), total);
    }
  float zsum = hsum(total);
  for (; l < n; ++l) {
    ps[l] = p[l] * s[l * stride];
    zsum += p[l] * z[l * stride];
  }
  return zsum;
}

// out[r] = quantized[r] @ rotation + plain[r] for each of `rows` rows of D (no rotation: the sum), written
// in out's dtype (float32 or bfloat16): the values' basis turned back (H H = I) without three more ATen ops per layer.
inline void rotate_and_add(const float* quantized, const float* plain, const float* rotation, int64_t rows, int64_t D,
                           torch::Tensor& out) {
  std::vector<float> row(D);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = quantized + r * D;
    std::copy(plain + r * D, plain + (r + 1) * D, row.begin());
    if (rotation == nullptr) {
      for (int64_t d = 0; d < D; ++d) row[d] += x[d];
    } else {
      for (int64_t e = 0; e < D; ++e)
        for (int64_t d = 0; d < D; ++d) row[d] += x[e] * rotation[e * D + d];
    }
    if (out.scalar_type() == torch::kFloat32) {
      std::copy(row.begin(), row.end(), out.data_ptr<float>() + r * D);
    } else {
      auto* o = out.data_ptr<at::BFloat16>() + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<at::BFloat16>(row[d]);
    }
  }
}

}  // namespace leanlm_attention
