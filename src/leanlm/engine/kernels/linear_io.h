// Input and output of the decode linear kernels (linear_small_m.cpp, linear_int4.cpp): the few input rows
// as float32, a bias or row scale read in its own dtype, and one epilogue that rounds once to x's dtype.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace leanlm_linear {

// The sum of a vector's 8 float32 lanes.
inline float horizontal_sum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}

// The int8 rounding of a block of n inputs (linear_int8.cpp, linear_int4.cpp): x ~= nearbyint(x * inverse) * step,
// step = max |x| / 127. A block of zeros, or of values so tiny (|x| < 4e-37) that 127 / max is infinite, rounds to
// zeros. A NaN input makes the step NaN, so that the outputs it reaches are NaN, as with float inputs; an infinite
// one makes the step infinite and its block's codes 0, so those outputs are NaN too (not +-inf as in float).
struct BlockStep {
  float step, inverse;
};

inline BlockStep block_step(const float* x, int64_t n) {  // n a multiple of 8
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 top = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v));  // (max_ps drops a NaN in its first operand: tracked apart)
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan) != 0) return {std::numeric_limits<float>::quiet_NaN(), 0.f};
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  return {amax / 127.f, std::isfinite(127.f / amax) ? 127.f / amax : 0.f};
}

// f(std::integral_constant<int, M>{}) for m input rows (1..8; more: 8): the kernels' loops are templates on the
// row count, so that their accumulators are register arrays.
template <typename F>
inline void with_row_count(int64_t m, F&& f) {
  switch (m) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// x (any float dtype) as contiguous float32 rows: the few decode rows are widened here, not by ATen ops.
inline std::vector<float> float_rows(const torch::Tensor& x, int64_t K) {
  auto rows = x.reshape({-1, K});
  if (rows.scalar_type() != torch::kFloat32 && rows.scalar_type() != torch::kBFloat16) rows = rows.to(torch::kFloat32);
  rows = rows.contiguous();
  std::vector<float> out(rows.numel());
  if (rows.scalar_type() == torch::kFloat32) {
    std::copy(rows.data_ptr<float>(), rows.data_ptr<float>() + out.size(), out.begin());
  } else {
    const at::BFloat16* p = rows.data_ptr<at::BFloat16>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(p[i]);
  }
  return out;
}

// A bias or row scale as float32, read in its own dtype: an ATen conversion op per call cost ~10 us,
// as much as streaming a small decode weight.
inline std::vector<float> optional_floats(const c10::optional<torch::Tensor>& t, int64_t N, const char* what) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->numel() == N, what, " has ", t->numel(), " values for ", N, " outputs");
  const torch::Tensor values = t->is_contiguous() ? *t : t->contiguous();
  std::vector<float> out(N);
  switch (values.scalar_type()) {
    case torch::kFloat32: std::copy(values.data_ptr<float>(), values.data_ptr<float>() + N, out.begin()); break;
    case torch::kBFloat16: {
      const at::BFloat16* p = values.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < N; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    case torch::kHalf: {
      const at::Half* p = values.data_ptr<at::Half>();
      for (int64_t i = 0; i < N; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    default: {
      const torch::Tensor f = values.to(torch::kFloat32);
      std::copy(f.data_ptr<float>(), f.data_ptr<float>() + N, out.begin());
    }
  }
  return out;
}

// dots (M, N) float32 -> x's shape with N features, times the row scale and plus the bias (either may be
// empty), rounded once to bf16 for a bf16 x and to float32 otherwise, then to x's dtype.
inline torch::Tensor finish_rows(const torch::Tensor& x, const std::vector<float>& dots, int64_t M, int64_t N,
                                 const std::vector<float>& scale, const std::vector<float>& shift) {
  auto shape = x.sizes().vec();
  auto out = torch::empty({M, N}, x.options().dtype(x.scalar_type() == torch::kBFloat16 ? torch::kBFloat16 : torch::kFloat32));
  at::BFloat16* out_bf16 = out.scalar_type() == torch::kBFloat16 ? out.data_ptr<at::BFloat16>() : nullptr;
  float* out_f32 = out_bf16 == nullptr ? out.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float v = dots[m * N + n];
      if (!scale.empty()) v *= scale[n];
      if (!shift.empty()) v += shift[n];
      if (out_bf16 != nullptr) out_bf16[m * N + n] = at::BFloat16(v);
      else out_f32[m * N + n] = v;
    }
  shape.back() = N;
  return out.to(x.scalar_type()).reshape(shape);
}

// linear_avx512.cpp: whether this CPU has AVX-512 (F, BW, VL) and AVX512-BF16; x (..., K) bf16 times a
// (N, K) bf16 weight (K a multiple of 32) as float32 dots (M, N) by vdpbf16ps. ``avx512_enabled`` is the A/B
// switch of the AVX-512 paths (this one and linear_int8.cpp's VNNI path).
bool has_avx512();
bool has_avx512_bf16();
bool has_avx512_vnni();  // linear_int8.cpp's integer dot products (vpdpbusd)
extern std::atomic<bool> avx512_enabled;
std::vector<float> bf16_pair_dots(const torch::Tensor& x, const uint16_t* w, int64_t N, int64_t K);

}  // namespace leanlm_linear
