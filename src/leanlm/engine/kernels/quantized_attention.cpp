// Decode attention over a KIVI cache (kvcache/quantized.py) read as codes: one query per head,
// against T quantized tokens followed by R full-precision ones (the residual, the new token last).
//
// Keys are quantized per channel over groups of `gk` tokens, values per token over groups of `gv`
// channels (optionally in a Hadamard-rotated basis); a value is code * scale + low (float16 scale
// and low per group), its codes packed in planes (quant.pack: byte i of a group's row holds codes
// i, i + n/k, i + 2n/k ... for k codes a byte). So, with s, z a group's scale and low:
//   q . k_t     = sum_d (q_d s_dg) code_dt + sum_d q_d z_dg          (keys, per channel)
//   sum_t p_t v_t = sum_t (p_t s_t) code_t + sum_t p_t z_t            (values, per token and group)
// The codes are widened to float32 in registers, 8 at a time, and multiplied into every query head
// of the KV head's group at once: each code byte is read from memory once per step, and no
// dequantized (tokens, head_dim) copy exists. With int8=True (the default) 2- and 4-bit codes take
// integer dot products instead (int8_dots.h: the float side rounded to int8 with a step per 16 factors,
// 32 codes per instruction) where key rows and value groups are a multiple of 16 bytes (keys: head_dim a
// multiple of 16; values: tasks of a multiple of 16 tokens); 8-bit codes and other layouts stay on floats.
// The value sums of the quantized tokens are rotated back once (out @ H) and the residual's are added.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "attention_blocks.h"
#include "int8_dots.h"

#include <cmath>
#include <utility>
#include <vector>

namespace {

using namespace leanlm_attention;

inline float half_to_float(const at::Half& h) { return _cvtsh_ss(h.x); }

// The 8 codes of plane `plane` in 8 packed bytes (already widened to int32 lanes), as float32.
template <int BITS>
inline __m256 plane_codes(__m256i bytes, int plane) {
  if (BITS == 8) return _mm256_cvtepi32_ps(bytes);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(bytes, plane * BITS), mask));
}

inline __m256i load_bytes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// Scores of GH query heads against one key group (gk tokens of one KV head): qs (GH x D) holds
// q_d * s_dg * scale, bias (GH) sum_d q_d z_dg * scale; codes row d at codes + d * row_stride
// (bytes_per_row = gk * BITS / 8 bytes). scores[g * L + token] for the group's tokens. One plane at a
// time (the 8 bytes are re-read per plane, from L1).
template <int BITS, int GH>
void key_group_scores(const float* qs, const float* bias, const uint8_t* codes, int64_t row_stride,
                      int64_t bytes_per_row, int64_t D, float* scores, int64_t L) {
  constexpr int PLANES = 8 / BITS, U = chains<GH>();
  for (int64_t c = 0; c < bytes_per_row; c += 8) {
    for (int p = 0; p < PLANES; ++p) {
      __m256 acc[U][GH];
      zero_chains(acc);
      for (int64_t d = 0; d < D; d += U) {  // D is a multiple of 8
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          const __m256 code = plane_codes<BITS>(load_bytes8(codes + (d + u) * row_stride + c), p);
#pragma GCC unroll 8
          for (int g = 0; g < GH; ++g)
            acc[u][g] = _mm256_fmadd_ps(code, _mm256_broadcast_ss(qs + g * D + d + u), acc[u][g]);
        }
      }
#pragma GCC unroll 8
      for (int g = 0; g < GH; ++g)  // plane p, byte c + lane holds token p * bytes_per_row + c + lane
        _mm256_storeu_ps(scores + g * L + p * bytes_per_row + c, sum_chains(acc, g, _mm256_set1_ps(bias[g])));
    }
  }
}

// out[g, column] += sum over tokens [l0, l1) of ps[g, l - l0] * code[l, column] for the columns of one
// value group (gv channels at out + group * gv); codes of token l at codes + l * token_stride.
template <int BITS, int GH>
void value_group_sums(const float* ps, int64_t block, const uint8_t* codes, int64_t token_stride, int64_t l0,
                      int64_t l1, int64_t bytes_per_group, int64_t D, float* out) {
  constexpr int PLANES = 8 / BITS, U = chains<GH>();
  for (int64_t c = 0; c < bytes_per_group; c += 8) {
    for (int p = 0; p < PLANES; ++p) {
      __m256 acc[U][GH];
      zero_chains(acc);
      int64_t l = l0;
      for (; l + U <= l1; l += U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          const __m256 code = plane_codes<BITS>(load_bytes8(codes + (l + u) * token_stride + c), p);
#pragma GCC unroll 8
          for (int g = 0; g < GH; ++g)
            acc[u][g] = _mm256_fmadd_ps(code, _mm256_broadcast_ss(ps + g * block + (l + u - l0)), acc[u][g]);
        }
      }
      for (; l < l1; ++l) {
        const __m256 code = plane_codes<BITS>(load_bytes8(codes + l * token_stride + c), p);
#pragma GCC unroll 8
        for (int g = 0; g < GH; ++g) acc[0][g] = _mm256_fmadd_ps(code, _mm256_broadcast_ss(ps + g * block + (l - l0)), acc[0][g]);
      }
#pragma GCC unroll 8
      for (int g = 0; g < GH; ++g) {
        float* o = out + g * D + p * bytes_per_group + c;
        _mm256_storeu_ps(o, sum_chains(acc, g, _mm256_loadu_ps(o)));
      }
    }
  }
}

// n float16 values, `stride` apart, as float32 (vectorised where they are contiguous).
inline void halves_to_floats(const at::Half* p, int64_t stride, int64_t n, float* out) {
  int64_t i = 0;
  if (stride == 1)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  for (; i < n; ++i) out[i] = half_to_float(p[i * stride]);
}

// Query heads per pass: on the float path GH accumulators + their broadcasts fit 16 registers (the int8
// path keeps planes x GH int16 sums, which spill to L1 beyond GH = 3 at 2 bits).
constexpr int MAX_GH = 8;
// Tokens per task: each task pays a fixed cost (scratch, its block's partial sums, one more block to join)
// that 64-token blocks made a fifth of the kernel's time at 16K; 256 still gives 3 KV heads x 16 tasks at 4K.
constexpr int64_t QUANTIZED_BLOCK = 256;

#define LEANLM_DISPATCH_HEADS(GH_VALUE, CALL) \
  switch (GH_VALUE) {                         \
    case 1: CALL(1); break;                   \
    case 2: CALL(2); break;                   \
    case 3: CALL(3); break;                   \
    case 4: CALL(4); break;                   \
    case 5: CALL(5); break;                   \
    case 6: CALL(6); break;                   \
    case 7: CALL(7); break;                   \
    default: CALL(8); break;                  \
  }

struct Layout {  // per (batch, kv head): sizes of the packed tensors, and the key tensors' strides
  int64_t D, G, T, gk, key_groups, key_row_bytes, gv, value_groups, value_group_bytes;
  int64_t code_channel, code_group, scale_channel, scale_group;  // strides of (channel, group) in codes / scales
  bool int8_keys, int8_values;  // integer dot products (int8_dots.h) for the key scores / value sums
};

// Scores of one KV head's G query heads against its key group `kg` (scale, low: one per (channel,
// group)) into out[g * out_stride + token of the group].
template <int BITS>
void key_group(const float* q, const uint8_t* codes, const at::Half* scale, const at::Half* low, int64_t kg,
               float softmax_scale, const Layout& s, float* out, int64_t out_stride) {
  float qs[MAX_GH * 256], bias[MAX_GH], sf[256], zf[256];  // head_dim <= 256 (checked)
  halves_to_floats(scale + kg * s.scale_group, s.scale_channel, s.D, sf);
  halves_to_floats(low + kg * s.scale_group, s.scale_channel, s.D, zf);
  const __m256 qscale = _mm256_set1_ps(softmax_scale);
  for (int64_t g0 = 0; g0 < s.G; g0 += MAX_GH) {
    const int gh = static_cast<int>(std::min<int64_t>(MAX_GH, s.G - g0));
    for (int g = 0; g < gh; ++g) {
      __m256 b = _mm256_setzero_ps();
      for (int64_t d = 0; d < s.D; d += 8) {
        const __m256 qd = _mm256_mul_ps(_mm256_loadu_ps(q + (g0 + g) * s.D + d), qscale);
        _mm256_storeu_ps(qs + g * s.D + d, _mm256_mul_ps(qd, _mm256_loadu_ps(sf + d)));
        b = _mm256_fmadd_ps(qd, _mm256_loadu_ps(zf + d), b);
      }
      bias[g] = hsum(b);
    }
    const uint8_t* first = codes + kg * s.code_group;
    float* o = out + g0 * out_stride;
    if (s.int8_keys) {
      int16_t pairs[MAX_GH * 128];
      float steps[MAX_GH * 256 / INT8_BLOCK], corrected[MAX_GH];
      for (int g = 0; g < gh; ++g)
        corrected[g] = bias[g] + code_midpoint<BITS>() * to_int8(qs + g * s.D, s.D, pairs + g * (s.D / 2), steps + g * (s.D / INT8_BLOCK));
#define LEANLM_KEYS(N) int8_row_dots<BITS, N>(pairs, steps, s.D, first, s.code_channel, s.key_row_bytes, o, out_stride, corrected)
      LEANLM_DISPATCH_HEADS(gh, LEANLM_KEYS)
#undef LEANLM_KEYS
      continue;
    }
#define LEANLM_KEYS(N) key_group_scores<BITS, N>(qs, bias, first, s.code_channel, s.key_row_bytes, s.D, o, out_stride)
    LEANLM_DISPATCH_HEADS(gh, LEANLM_KEYS)
#undef LEANLM_KEYS
  }
}

// Value sums of one KV head's G query heads over n quantized tokens starting at codes/scale/low
// (token-major): out (G x D, zeroed) += sum_l p[g * n + l] * v_l, in the values' basis.
template <int BITS>
void value_codes_block(const float* p, int64_t n, const uint8_t* codes, const at::Half* scale, const at::Half* low,
                       const Layout& s, float* out) {
  const int64_t VG = s.value_groups, token_stride = VG * s.value_group_bytes;
  std::vector<float>& buffer = scratch(2 * n * VG + MAX_GH * n + MAX_GH * n / 4 + MAX_GH * n / INT8_BLOCK + 1);
  float *sf = buffer.data(), *zf = sf + n * VG, *ps = zf + n * VG;
  int16_t* pairs = reinterpret_cast<int16_t*>(ps + MAX_GH * n);  // the int8 path's factors: n / 2 int16 per head
  const bool int8 = s.int8_values && n % INT8_BLOCK == 0;
  halves_to_floats(scale, 1, n * VG, sf);  // the block's scales, token-major
  halves_to_floats(low, 1, n * VG, zf);
  for (int64_t vg = 0; vg < VG; ++vg) {
    for (int64_t g0 = 0; g0 < s.G; g0 += MAX_GH) {
      const int gh = static_cast<int>(std::min<int64_t>(MAX_GH, s.G - g0));
      for (int g = 0; g < gh; ++g) {
        const float zsum = scale_weights(p + (g0 + g) * n, sf + vg, zf + vg, VG, n, ps + g * n);
        float* o = out + (g0 + g) * s.D + vg * s.gv;
        for (int64_t j = 0; j < s.gv; ++j) o[j] += zsum;
      }
      float* o = out + g0 * s.D + vg * s.gv;
      if (int8) {
        float* steps = reinterpret_cast<float*>(pairs + MAX_GH * n / 2);
        for (int g = 0; g < gh; ++g) {
          const float shift = code_midpoint<BITS>() * to_int8(ps + g * n, n, pairs + g * (n / 2), steps + g * (n / INT8_BLOCK));
          for (int64_t j = 0; j < s.gv; ++j) o[g * s.D + j] += shift;
        }
#define LEANLM_VALUES(N) int8_row_dots<BITS, N>(pairs, steps, n, codes + vg * s.value_group_bytes, token_stride, s.value_group_bytes, o, s.D, nullptr)
        LEANLM_DISPATCH_HEADS(gh, LEANLM_VALUES)
#undef LEANLM_VALUES
        continue;
      }
#define LEANLM_VALUES(N) value_group_sums<BITS, N>(ps, n, codes + vg * s.value_group_bytes, token_stride, 0, n, s.value_group_bytes, s.D, o)
      LEANLM_DISPATCH_HEADS(gh, LEANLM_VALUES)
#undef LEANLM_VALUES
    }
  }
}

// Flash-decoding: every task takes one KV head and one block of tokens (whole key groups, or the
// residual), scores it, exponentiates against the block's own maximum and sums the values with those
// weights; the blocks are then joined with their maxima and sums (exact softmax, one pass over the cache).
template <typename KV, int KBITS, int VBITS>
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& key_codes, const torch::Tensor& key_scale,
                     const torch::Tensor& key_low, const torch::Tensor& value_codes, const torch::Tensor& value_scale,
                     const torch::Tensor& value_low, const c10::optional<torch::Tensor>& rotation,
                     const torch::Tensor& res_keys, const torch::Tensor& res_values, double scale, bool int8) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = key_codes.size(1), R = res_keys.size(2);
  Layout s;
  s.D = D, s.G = H / KVH, s.key_groups = key_codes.size(3), s.key_row_bytes = key_codes.size(4);
  s.gk = s.key_row_bytes * 8 / KBITS, s.T = s.key_groups * s.gk;
  s.value_groups = value_codes.size(3), s.value_group_bytes = value_codes.size(4), s.gv = D / s.value_groups;
  s.code_channel = key_codes.stride(2), s.code_group = key_codes.stride(3);
  s.scale_channel = key_scale.stride(2), s.scale_group = key_scale.stride(3);
  s.int8_keys = int8 && KBITS != 8 && s.key_row_bytes % INT8_CHUNK == 0 && D % INT8_BLOCK == 0;  // 8-bit codes: int16 sums would saturate
  s.int8_values = int8 && VBITS != 8 && s.value_group_bytes % INT8_CHUNK == 0;
  const int64_t G = s.G, T = s.T;
  const int64_t groups_per_block = std::max<int64_t>(1, QUANTIZED_BLOCK / s.gk);  // whole key groups per task
  const int64_t blocks = (s.key_groups + groups_per_block - 1) / groups_per_block + 1;  // the last: the residual
  auto qf = q.to(torch::kFloat32).contiguous();
  auto partial = torch::empty({B, KVH, blocks, G, D + 2}, qf.options());  // per block: G x (D sums, max, sum)
  const float* qp = qf.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const uint8_t* kc = key_codes.data_ptr<uint8_t>();
  const uint8_t* vc = value_codes.data_ptr<uint8_t>();
  const auto* ks = reinterpret_cast<const at::Half*>(key_scale.data_ptr());
  const auto* kl = reinterpret_cast<const at::Half*>(key_low.data_ptr());
  const auto* vs = reinterpret_cast<const at::Half*>(value_scale.data_ptr());
  const auto* vl = reinterpret_cast<const at::Half*>(value_low.data_ptr());
  const KV* rk = reinterpret_cast<const KV*>(res_keys.data_ptr());
  const KV* rv = reinterpret_cast<const KV*>(res_values.data_ptr());
  const int64_t token_bytes = s.value_groups * s.value_group_bytes;
  at::parallel_for(0, B * KVH * blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores, sums;
    for (int64_t task = first; task < last; ++task) {
      const int64_t blk = task % blocks, bh = task / blocks, b = bh / KVH, head = bh % KVH;
      const float* qh = qp + (b * H + head * G) * D;
      const bool residual = blk == blocks - 1;
      const int64_t kg0 = blk * groups_per_block, kg1 = std::min(s.key_groups, kg0 + groups_per_block);
      const int64_t n = residual ? R : (kg1 - kg0) * s.gk;
      scores.resize(G * n);
      sums.assign(G * D, 0.f);
      if (residual) {
        score_block<KV>(qh, rk + bh * R * D, D, G, 0, R, static_cast<float>(scale), nullptr, scores.data(), n);
      } else {
        const uint8_t* codes = kc + b * key_codes.stride(0) + head * key_codes.stride(1);
        const int64_t scale_at = b * key_scale.stride(0) + head * key_scale.stride(1);
        for (int64_t kg = kg0; kg < kg1; ++kg)
          key_group<KBITS>(qh, codes, ks + scale_at, kl + scale_at, kg, static_cast<float>(scale), s,
                           scores.data() + (kg - kg0) * s.gk, n);
      }
      float* block_out = pp + task * G * (D + 2);
      for (int64_t g = 0; g < G; ++g) {  // p = exp(score - block max), in place; keep the max and the sum
        const auto stats = exp_against_max(scores.data() + g * n, n);
        block_out[g * (D + 2) + D] = stats.first;
        block_out[g * (D + 2) + D + 1] = stats.second;
      }
      if (residual) {
        value_block<KV>(scores.data(), rv + bh * R * D, D, G, 0, R, n, sums.data());
      } else {
        const int64_t l0 = kg0 * s.gk;
        value_codes_block<VBITS>(scores.data(), n, vc + (bh * T + l0) * token_bytes,
                                 vs + (bh * T + l0) * s.value_groups, vl + (bh * T + l0) * s.value_groups, s, sums.data());
      }
      for (int64_t g = 0; g < G; ++g) std::copy(sums.begin() + g * D, sums.begin() + (g + 1) * D, block_out + g * (D + 2));
    }
  });
  // join the blocks: weights exp(block max - overall max); quantized blocks and the residual apart (bases differ)
  std::vector<float> quantized(B * H * D), plain(B * H * D);
  join_blocks(pp, B * KVH, blocks, G, D, quantized.data(), plain.data(), blocks - 1);
  torch::Tensor rot;
  if (rotation.has_value()) rot = rotation->to(torch::kFloat32).contiguous();
  const bool direct = q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16;
  auto out = torch::empty({B, H, D}, direct ? q.options() : qf.options());
  rotate_and_add(quantized.data(), plain.data(), rotation.has_value() ? rot.data_ptr<float>() : nullptr, B * H, D, out);
  return direct ? out : out.to(q.scalar_type());
}

template <typename KV, int KBITS>
torch::Tensor attend_value_bits(int64_t value_bits, const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& ks,
                                const torch::Tensor& kl, const torch::Tensor& vc, const torch::Tensor& vs, const torch::Tensor& vl,
                                const c10::optional<torch::Tensor>& rot, const torch::Tensor& rk, const torch::Tensor& rv,
                                double scale, bool int8) {
  if (value_bits == 2) return attend<KV, KBITS, 2>(q, kc, ks, kl, vc, vs, vl, rot, rk, rv, scale, int8);
  if (value_bits == 4) return attend<KV, KBITS, 4>(q, kc, ks, kl, vc, vs, vl, rot, rk, rv, scale, int8);
  return attend<KV, KBITS, 8>(q, kc, ks, kl, vc, vs, vl, rot, rk, rv, scale, int8);
}

template <typename KV>
torch::Tensor attend_bits(int64_t key_bits, int64_t value_bits, const torch::Tensor& q, const torch::Tensor& kc,
                          const torch::Tensor& ks, const torch::Tensor& kl, const torch::Tensor& vc, const torch::Tensor& vs,
                          const torch::Tensor& vl, const c10::optional<torch::Tensor>& rot, const torch::Tensor& rk,
                          const torch::Tensor& rv, double scale, bool int8) {
  if (key_bits == 2) return attend_value_bits<KV, 2>(value_bits, q, kc, ks, kl, vc, vs, vl, rot, rk, rv, scale, int8);
  if (key_bits == 4) return attend_value_bits<KV, 4>(value_bits, q, kc, ks, kl, vc, vs, vl, rot, rk, rv, scale, int8);
  return attend_value_bits<KV, 8>(value_bits, q, kc, ks, kl, vc, vs, vl, rot, rk, rv, scale, int8);
}

// Value tensors must be contiguous; key tensors may be any (channel, group) arrangement of the first four
// dims (a cache stores them group-major: a group's rows are then one contiguous block) with scale and low
// laid out alike and each group's bytes contiguous.
void check_codes(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& low, int64_t bits,
                 bool contiguous, const char* what) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, what, " bits must be 2, 4 or 8");
  TORCH_CHECK(codes.dim() == 5 && codes.scalar_type() == torch::kUInt8 && codes.stride(4) == 1 &&
              (!contiguous || codes.is_contiguous()), what, " codes must be uint8 (B, KVH, rows, groups, bytes)",
              contiguous ? ", contiguous" : ", each group's bytes contiguous");
  TORCH_CHECK(codes.size(4) % 8 == 0, what, " groups must pack to a multiple of 8 bytes (group * bits % 64 == 0)");
  for (const auto* t : {&scale, &low}) {
    TORCH_CHECK(t->scalar_type() == torch::kHalf && t->dim() == 5 && t->sizes().slice(0, 4) == codes.sizes().slice(0, 4),
                what, " scale and low must be float16, one per group");
    TORCH_CHECK(contiguous ? t->is_contiguous() : t->strides() == scale.strides(), what, " scale and low must share a layout");
  }
}

}  // namespace

// q (B, H, D); key codes (B, KVH, D, key groups, gk * key_bits / 8) per channel, value codes
// (B, KVH, T, value groups, gv * value_bits / 8) per token, T = key groups * gk; scales and lows
// float16 (..., groups, 1); rotation (D, D) or None (values' basis); residual keys/values
// (B, KVH, R >= 1, D) bf16 or float32, attended after the T quantized tokens. Returns (B, H, D).
torch::Tensor quantized_decode_attention(torch::Tensor q, torch::Tensor key_codes, torch::Tensor key_scale,
                                         torch::Tensor key_low, torch::Tensor value_codes, torch::Tensor value_scale,
                                         torch::Tensor value_low, c10::optional<torch::Tensor> rotation,
                                         torch::Tensor res_keys, torch::Tensor res_values, int64_t key_bits,
                                         int64_t value_bits, double scale, bool int8) {
  TORCH_CHECK(q.dim() == 3 && res_keys.dim() == 4 && res_values.sizes() == res_keys.sizes(),
              "q must be (B, H, D), residual keys/values (B, KVH, R, D)");
  check_codes(key_codes, key_scale, key_low, key_bits, false, "key");
  check_codes(value_codes, value_scale, value_low, value_bits, true, "value");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = res_keys.size(1);
  TORCH_CHECK(D % 8 == 0 && D <= 256, "head_dim must be a multiple of 8, at most 256");
  TORCH_CHECK(H % KVH == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(res_keys.size(0) == B && res_keys.size(3) == D && res_keys.size(2) >= 1, "residual disagrees with q");
  TORCH_CHECK(key_codes.size(0) == B && key_codes.size(1) == KVH && key_codes.size(2) == D, "key codes disagree with q");
  const int64_t T = key_codes.size(3) * key_codes.size(4) * 8 / key_bits;
  TORCH_CHECK(value_codes.size(0) == B && value_codes.size(1) == KVH && value_codes.size(2) == T,
              "value codes must cover the key codes' tokens");
  TORCH_CHECK(D % value_codes.size(3) == 0 && value_codes.size(4) * 8 / value_bits * value_codes.size(3) == D, "value groups must cover head_dim");
  TORCH_CHECK(res_keys.is_contiguous() && res_values.is_contiguous() && res_keys.scalar_type() == res_values.scalar_type(),
              "residual keys/values must be contiguous, of one dtype");
  if (rotation.has_value()) TORCH_CHECK(rotation->dim() == 2 && rotation->size(0) == D && rotation->size(1) == D, "rotation must be (D, D)");
  if (res_keys.scalar_type() == torch::kBFloat16)
    return attend_bits<at::BFloat16>(key_bits, value_bits, q, key_codes, key_scale, key_low, value_codes, value_scale,
                                     value_low, rotation, res_keys, res_values, scale, int8);
  TORCH_CHECK(res_keys.scalar_type() == torch::kFloat32, "the residual must be bfloat16 or float32");
  return attend_bits<float>(key_bits, value_bits, q, key_codes, key_scale, key_low, value_codes, value_scale, value_low,
                            rotation, res_keys, res_values, scale, int8);
}

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("quantized_decode_attention(Tensor q, Tensor key_codes, Tensor key_scale, Tensor key_low, Tensor value_codes, "
        "Tensor value_scale, Tensor value_low, Tensor? rotation, Tensor res_keys, Tensor res_values, int key_bits, "
        "int value_bits, float scale, bool int8=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("quantized_decode_attention", &quantized_decode_attention); }
