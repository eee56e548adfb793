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

#include "attention_blocks.h"

namespace {

using namespace leanlm_attention;

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
