// Decode attention: one query per sequence and head against the first `length` slots of a K/V cache.
//
// PyTorch's CPU flash attention spent ~0.4 ms per layer on a single query over 512 bf16 slots of
// SmolLM2 (~1 GB/s of cache read): it is built for many queries. Here every task takes one KV head
// and a block of slots: it reads each key row once (bf16 widened to float32 in registers) and scores
// all query heads of its group against it (grouped-query attention without repeating K/V); softmax
// runs over the float32 scores; a second pass reads each value row once and accumulates the
// probability-weighted rows per block; the blocks' partial sums are added at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

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

template <typename KV, int GROUPS>
void value_columns(const float* p, const KV* values, int64_t D, int64_t l0, int64_t l1, int64_t length, float* out) {
  for (int64_t d = 0; d < D; d += 8) {
    __m256 acc[GROUPS];
#pragma GCC unroll 8
    for (int g = 0; g < GROUPS; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t l = l0; l < l1; ++l) {
      const __m256 row = load8(values + l * D + d);
#pragma GCC unroll 8
      for (int g = 0; g < GROUPS; ++g) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * length + l), row, acc[g]);
    }
#pragma GCC unroll 8
    for (int g = 0; g < GROUPS; ++g) _mm256_storeu_ps(out + g * D + d, acc[g]);
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

template <typename KV>
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values, int64_t length,
                     const c10::optional<torch::Tensor>& keep, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = keys.size(1), S = keys.size(2), G = H / KVH;
  const int64_t blocks = (length + BLOCK - 1) / BLOCK;
  auto qf = q.to(torch::kFloat32).contiguous();
  torch::Tensor keep8;
  if (keep.has_value()) {
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) == B && keep->size(1) >= length, "keep must be (batch, >= length)");
    keep8 = keep->narrow(1, 0, length).to(torch::kUInt8).contiguous();
  }
  const uint8_t* keep_ptr = keep8.defined() ? keep8.data_ptr<uint8_t>() : nullptr;
  auto scores = torch::empty({B, H, length}, qf.options());
  const KV* kp = reinterpret_cast<const KV*>(keys.data_ptr());
  const KV* vp = reinterpret_cast<const KV*>(values.data_ptr());
  const float* qp = qf.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  at::parallel_for(0, B * KVH * blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t blk = task % blocks, head = (task / blocks) % KVH, b = task / (blocks * KVH);
      score_block<KV>(qp + (b * H + head * G) * D, kp + (b * KVH + head) * S * D, D, G, blk * BLOCK,
                      std::min(length, (blk + 1) * BLOCK), static_cast<float>(scale),
                      keep_ptr == nullptr ? nullptr : keep_ptr + b * length, sp + (b * H + head * G) * length, length);
    }
  });
  auto probs = scores.softmax(-1).contiguous();  // ATen's vectorised softmax over float32 scores
  auto partial = torch::empty({blocks, B, H, D}, qf.options());  // every element is written once
  const float* pp = probs.data_ptr<float>();
  float* out = partial.data_ptr<float>();
  at::parallel_for(0, B * KVH * blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t blk = task % blocks, head = (task / blocks) % KVH, b = task / (blocks * KVH);
      value_block<KV>(pp + (b * H + head * G) * length, vp + (b * KVH + head) * S * D, D, G, blk * BLOCK,
                      std::min(length, (blk + 1) * BLOCK), length, out + ((blk * B + b) * H + head * G) * D);
    }
  });
  return partial.sum(0).to(q.scalar_type());
}

}  // namespace

// q (batch, heads, head_dim); keys/values (batch, kv_heads, slots, head_dim), contiguous, bf16 or float32;
// attends to slots [0, length) (length: a one-element integer tensor); keep (batch, >= length), nonzero = attend; returns (batch, heads, head_dim).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor length_tensor,
                               c10::optional<torch::Tensor> keep, double scale) {
  // The length is a tensor so that a compiled step does not specialise (and recompile) on every value.
  TORCH_CHECK(length_tensor.numel() == 1, "length must hold one value");
  const int64_t length = length_tensor.item<int64_t>();
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(), "q must be (B, H, D), keys/values (B, KVH, S, D)");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "keys and values must be contiguous");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "keys and values must share a dtype");
  TORCH_CHECK(q.size(0) == keys.size(0) && q.size(2) == keys.size(3), "q and the cache disagree on batch or head_dim");
  TORCH_CHECK(q.size(1) % keys.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(keys.size(3) % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(length >= 1 && length <= keys.size(2), "length must be in [1, slots]");
  if (keys.scalar_type() == torch::kBFloat16) return attend<at::BFloat16>(q, keys, values, length, keep, scale);
  TORCH_CHECK(keys.scalar_type() == torch::kFloat32, "the cache must be bfloat16 or float32");
  return attend<float>(q, keys, values, length, keep, scale);
}

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor length, Tensor? keep, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("decode_attention", &decode_attention); }
