// Decode attention: one query per sequence and head against the first `length` slots of a K/V cache.
// A chain of queries (speculative verification: consecutive tokens of one sequence) passes a cache of
// batch 1 shared by every query row and one length per row (causal: row i sees slots [0, length[i])):
// each row then computes exactly what a one-token step at that length computes, bit for bit, since
// the blocks past a row's length are empty (weight 0, added as exact zeros).
// (History: a two-pass version with ATen softmax/sum/cast ops spent ~60 us of ~85 us per call at 512
// slots on those per-call ops; now one pass, no ATen op unless the batch is padded.)
//
// PyTorch's CPU flash attention spent ~0.4 ms per layer on a single query over 512 bf16 slots of
// SmolLM2 (~1 GB/s of cache read): it is built for many queries. Here every task takes one KV head
// and a block of slots: it reads each key row once (bf16 widened to float32 in registers) and scores
// all query heads of its group against it (grouped-query attention without repeating K/V); softmax
// runs over the float32 scores; a second pass reads each value row once and accumulates the
// probability-weighted rows per block; the blocks' partial sums are added at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "attention_blocks.h"

namespace {

using namespace leanlm_attention;

// q's heads of one KV head as float32 (G x D).
template <typename Q>
void float_queries(const Q* q, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]);
}

// Flash-decoding in one pass and one parallel region, no ATen op on the way: every task takes one KV
// head and one block of slots, scores it, exponentiates against the block's own maximum and sums the
// value rows with those weights; the blocks are then joined with their maxima and sums (exact softmax).
template <typename KV, typename Q>
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values, const int64_t* lengths,
                     bool per_row, const uint8_t* keep, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = keys.size(1), S = keys.size(2), G = H / KVH;
  const bool shared = keys.size(0) == 1 && B > 1;  // a chain of queries over one cache
  const int64_t length = per_row ? *std::max_element(lengths, lengths + B) : lengths[0];  // keep's row stride
  const int64_t blocks = (length + BLOCK - 1) / BLOCK;
  std::vector<float> partial(B * KVH * blocks * G * (D + 2)), out(B * H * D);
  const KV* kp = reinterpret_cast<const KV*>(keys.data_ptr());
  const KV* vp = reinterpret_cast<const KV*>(values.data_ptr());
  const Q* qp = reinterpret_cast<const Q*>(q.data_ptr());
  at::parallel_for(0, B * KVH * blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> qf(G * D), scores(G * BLOCK), sums(G * D);
    for (int64_t task = first; task < last; ++task) {
      const int64_t blk = task % blocks, bh = task / blocks, b = bh / KVH, head = bh % KVH;
      const int64_t row_length = per_row ? lengths[b] : length, kv = shared ? head : bh;
      const int64_t l0 = blk * BLOCK, n = std::min(row_length, l0 + BLOCK) - l0;
      float* block_out = partial.data() + task * G * (D + 2);
      if (n <= 0) {  // past this row's length: an empty block (weight exp(-inf) = 0 when joined)
        for (int64_t g = 0; g < G; ++g) {
          std::fill(block_out + g * (D + 2), block_out + g * (D + 2) + D, 0.f);
          block_out[g * (D + 2) + D] = -std::numeric_limits<float>::infinity();
          block_out[g * (D + 2) + D + 1] = 0.f;
        }
        continue;
      }
      float_queries<Q>(qp + (b * H + head * G) * D, G * D, qf.data());
      const KV* kh = kp + (kv * S + l0) * D;
      score_block<KV>(qf.data(), kh, D, G, 0, n, static_cast<float>(scale), keep == nullptr ? nullptr : keep + b * length + l0,
                      scores.data(), n);
      for (int64_t g = 0; g < G; ++g) {
        const auto stats = exp_against_max(scores.data() + g * n, n);
        block_out[g * (D + 2) + D] = stats.first;
        block_out[g * (D + 2) + D + 1] = stats.second;
      }
      value_block<KV>(scores.data(), vp + (kv * S + l0) * D, D, G, 0, n, n, sums.data());
      for (int64_t g = 0; g < G; ++g) std::copy(sums.begin() + g * D, sums.begin() + (g + 1) * D, block_out + g * (D + 2));
    }
  });
  join_blocks(partial.data(), B * KVH, blocks, G, D, out.data(), nullptr, blocks);
  auto result = torch::empty({B, H, D}, q.options());
  Q* rp = reinterpret_cast<Q*>(result.data_ptr());
  for (int64_t i = 0; i < B * H * D; ++i) rp[i] = static_cast<Q>(out[i]);
  return result;
}

}  // namespace

// q (batch, heads, head_dim); keys/values (batch, kv_heads, slots, head_dim), contiguous, bf16 or float32;
// attends to slots [0, length) (length: a one-element integer tensor, or one per query row); keep (batch, >=
// length), nonzero = attend; returns (batch, heads, head_dim). keys/values of batch 1 with q of batch B > 1:
// B queries over one shared cache (a chain of tokens, with one length per row).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor length_tensor,
                               c10::optional<torch::Tensor> keep, double scale) {
  // The length is a tensor so that a compiled step does not specialise (and recompile) on every value.
  TORCH_CHECK(length_tensor.numel() == 1 || length_tensor.numel() == q.size(0), "length must hold one value or one per query row");
  const torch::Tensor lengths = length_tensor.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* length_ptr = lengths.data_ptr<int64_t>();
  const bool per_row = lengths.numel() > 1;
  const int64_t length = *std::max_element(length_ptr, length_ptr + lengths.numel());
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(), "q must be (B, H, D), keys/values (B, KVH, S, D)");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "keys and values must be contiguous");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "keys and values must share a dtype");
  TORCH_CHECK((q.size(0) == keys.size(0) || keys.size(0) == 1) && q.size(2) == keys.size(3),
              "q and the cache disagree on batch or head_dim");
  TORCH_CHECK(q.size(1) % keys.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(keys.size(3) % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(*std::min_element(length_ptr, length_ptr + lengths.numel()) >= 1 && length <= keys.size(2),
              "length must be in [1, slots]");
  torch::Tensor keep8;  // pads of a left-padded batch: only then an ATen conversion
  if (keep.has_value()) {
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) == q.size(0) && keep->size(1) >= length, "keep must be (batch, >= length)");
    keep8 = keep->narrow(1, 0, length).to(torch::kUInt8).contiguous();
  }
  const uint8_t* keep_ptr = keep8.defined() ? keep8.data_ptr<uint8_t>() : nullptr;
  TORCH_CHECK(keys.scalar_type() == torch::kBFloat16 || keys.scalar_type() == torch::kFloat32,
              "the cache must be bfloat16 or float32");
  const torch::Tensor qc = q.is_contiguous() ? q : q.contiguous();
  const bool bf16_cache = keys.scalar_type() == torch::kBFloat16;
  if (qc.scalar_type() == torch::kBFloat16)
    return bf16_cache ? attend<at::BFloat16, at::BFloat16>(qc, keys, values, length_ptr, per_row, keep_ptr, scale)
                      : attend<float, at::BFloat16>(qc, keys, values, length_ptr, per_row, keep_ptr, scale);
  if (qc.scalar_type() == torch::kFloat32)
    return bf16_cache ? attend<at::BFloat16, float>(qc, keys, values, length_ptr, per_row, keep_ptr, scale)
                      : attend<float, float>(qc, keys, values, length_ptr, per_row, keep_ptr, scale);
  const torch::Tensor q32 = qc.to(torch::kFloat32);  // other query dtypes: through float32
  return (bf16_cache ? attend<at::BFloat16, float>(q32, keys, values, length_ptr, per_row, keep_ptr, scale)
                     : attend<float, float>(q32, keys, values, length_ptr, per_row, keep_ptr, scale)).to(q.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor length, Tensor? keep, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("decode_attention", &decode_attention); }
