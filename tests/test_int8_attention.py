"""The quantized cache's decode kernel with integer dot products (``engine/kernels/int8_dots.h``): its
output equals a float64 emulation of that arithmetic (query and softmax-weight factors rounded
to int8 in blocks of 16 with their own steps, the rounding residuals times the codes' midpoint added
back, everything else exact; equal up to a factor landing on the other side of a rounding tie), for
every code width the
integer path takes; the emulation differs from plain attention over the dequantized cache by far more
than the tolerance, so the comparison pins the rounding itself. 8-bit codes and rows that are not a
multiple of 16 bytes keep the float32 path (equal to the dequantized reference, tests/test_quantized_lean_step.py)."""

from __future__ import annotations

import pytest
import torch

from leanlm.engine import kernels
from leanlm.kvcache.quant import dequantize, hadamard, quantize, unpack
from leanlm.kvcache.quantized import cat_key_groups

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="leanlm's CPU kernels cannot be built here")
TASK_TOKENS = 256  # QUANTIZED_BLOCK in quantized_attention.cpp: tokens per task (whole key groups)


def int8_round(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) float32 → (factor * step per block of 16 along the last dim, as the kernel rounds it;
    the midpoint of the codes times the summed rounding residuals, which the kernel adds back)."""
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    top = blocks.abs().amax(-1, keepdim=True)
    step = torch.where(top > 0, top / 127, torch.ones_like(top))
    rounded = (torch.round(blocks * (1 / step)).double() * step.double()).reshape(x.shape)
    return rounded, ((1 << bits) - 1) / 2 * (x.double() - rounded).sum(-1)


def emulate(q, qk, qv, rot, res_k, res_v, scale, int8_keys, int8_values):
    """The kernel's arithmetic in float64 (q (B, H, D) → (B, H, D)), int8 rounding where it applies."""
    batch, heads, dim = q.shape
    kv_heads, groups, gk = qk.codes.shape[1], qk.codes.shape[3], qk.shape[-1] // qk.codes.shape[3]
    group_heads, tokens = heads // kv_heads, qk.shape[-1]
    key_codes = unpack(qk.codes, qk.bits).double()  # (B, KVH, D, G, gk)
    qd = (q.float() * scale).view(batch, kv_heads, group_heads, dim)
    qs = qd[..., None] * qk.scale[..., 0].float()[:, :, None]  # (B, KVH, g, D, G): float32, as the kernel forms it
    bias = torch.einsum("bkgd,bkdG->bkgG", qd.double(), qk.low[..., 0].double())
    if int8_keys:
        rounded, shift = int8_round(qs.transpose(-1, -2), qk.bits)  # (B, KVH, g, G, D), (B, KVH, g, G)
        qs, bias = rounded.transpose(-1, -2), bias + shift
    else:
        qs = qs.double()
    scores = torch.einsum("bkgdG,bkdGj->bkgGj", qs, key_codes) + bias[..., None]
    scores = scores.reshape(batch, kv_heads, group_heads, tokens)
    value_codes = unpack(qv.codes, qv.bits).double()  # (B, KVH, T, VG, gv)
    v_scale, v_low = qv.scale[..., 0].float(), qv.low[..., 0].double()  # (B, KVH, T, VG)
    per_task = max(1, TASK_TOKENS // gk) * gk
    maxima, sums, masses = [], [], []
    for t0 in range(0, tokens, per_task):
        block = scores[..., t0:t0 + per_task]
        top = block.amax(-1, keepdim=True)
        p = (block - top).exp()  # (B, KVH, g, n)
        ps = p.float()[..., None] * v_scale[:, :, None, t0:t0 + per_task]  # (B, KVH, g, n, VG)
        shift = 0
        if int8_values:
            rounded, shift = int8_round(ps.transpose(-1, -2), qv.bits)  # (B, KVH, g, VG, n), (B, KVH, g, VG)
            ps, shift = rounded.transpose(-1, -2), shift[..., None]
        out = torch.einsum("bkgnV,bknVj->bkgVj", ps.double(), value_codes[:, :, t0:t0 + per_task]) + shift
        out = out + torch.einsum("bkgn,bknV->bkgV", p, v_low[:, :, t0:t0 + per_task])[..., None]
        maxima.append(top)
        sums.append(out.flatten(-2))
        masses.append(p.sum(-1, keepdim=True))
    group_q = qd.double()
    res_scores = torch.einsum("bkgd,bkrd->bkgr", group_q, res_k.double())
    res_top = res_scores.amax(-1, keepdim=True)
    res_p = (res_scores - res_top).exp()
    overall = torch.stack(maxima + [res_top]).amax(0)
    weights = [(m - overall).exp() for m in maxima]
    res_weight = (res_top - overall).exp()
    total = sum(w * s for w, s in zip(weights, masses)) + res_weight * res_p.sum(-1, keepdim=True)
    quantized = sum(w * s for w, s in zip(weights, sums)) / total
    if rot is not None:
        quantized = quantized @ rot.double()
    plain = res_weight * torch.einsum("bkgr,bkrd->bkgd", res_p, res_v.double()) / total
    return (quantized + plain).reshape(batch, heads, dim)


@needs_kernels
@pytest.mark.parametrize("key_bits,value_bits,group,rotate,int8_keys,int8_values,dim,group_heads",
                         [(4, 2, 64, True, True, True, 64, 3), (2, 4, 64, False, True, True, 64, 3),
                          (4, 8, 32, False, True, False, 64, 3), (8, 4, 32, True, False, True, 64, 3),
                          (2, 2, 32, True, False, False, 64, 3), (4, 2, 64, True, True, True, 128, 10)])
def test_int8_kernel_equals_an_emulation_of_its_rounding(key_bits, value_bits, group, rotate, int8_keys, int8_values,
                                                         dim, group_heads):
    gen = torch.Generator().manual_seed(1)
    batch, kv_heads, tokens, residual = 2, 2, 640, 5  # 640: tasks of 256, 256 and 128 tokens
    heads = kv_heads * group_heads  # 10 query heads per KV head: two passes of the kernel's 8
    keys, values = (torch.randn(batch, kv_heads, tokens, dim, generator=gen) for _ in range(2))
    keys[..., 3] *= 8  # an outlier channel, as real keys have
    qk = cat_key_groups(None, quantize(keys.transpose(2, 3).contiguous(), key_bits, group))  # a cache's group-major layout
    qv = quantize(values, value_bits, group, rotate)
    res_k, res_v = (torch.randn(batch, kv_heads, residual, dim, generator=gen).bfloat16() for _ in range(2))
    q = torch.randn(batch, heads, dim, generator=gen) * 2
    rot = hadamard(dim) if rotate else None
    got = torch.ops.leanlm.quantized_decode_attention(q, qk.codes, qk.scale, qk.low, qv.codes, qv.scale, qv.low, rot,
                                                      res_k, res_v, key_bits, value_bits, 0.125, True).double()
    want = emulate(q, qk, qv, rot, res_k, res_v, 0.125, int8_keys, int8_values)
    exact = emulate(q, qk, qv, rot, res_k, res_v, 0.125, False, False)
    all_k = torch.cat([dequantize(qk).transpose(2, 3).double(), res_k.double()], 2)
    all_v = torch.cat([dequantize(qv).double(), res_v.double()], 2)
    plain = torch.einsum("bhd,bhtd->bht", q.double(), all_k.repeat_interleave(group_heads, 1)) * 0.125
    plain = torch.einsum("bht,bhtd->bhd", plain.softmax(-1), all_v.repeat_interleave(group_heads, 1))
    assert torch.allclose(exact, plain, atol=1e-6)  # without rounding: attention over the dequantized cache (float32 products)
    # Per head: the emulation's softmax weights come from float64 scores, the kernel's from float32 ones, so
    # a value factor within ~1e-4 of a step's tie may round the other way (one step x one code, ~1e-3 here):
    # nearly every head must match to 5e-5, each within one such flip.
    per_head = (got - want).abs().amax(-1)
    assert (per_head < 5e-5).float().mean() >= 0.95 and per_head.max() < 3e-3
    if int8_keys or int8_values:
        assert (want - exact).abs().max().item() > 100 * max(per_head.median().item(), 1e-5)  # it sees the rounding
    float_path = torch.ops.leanlm.quantized_decode_attention(q, qk.codes, qk.scale, qk.low, qv.codes, qv.scale, qv.low,
                                                             rot, res_k, res_v, key_bits, value_bits, 0.125, False)
    assert torch.allclose(float_path.double(), plain, atol=5e-5, rtol=1e-4)


@needs_kernels
def test_the_switch_picks_the_path_of_a_decode(monkeypatch):
    """``use_int8_attention`` reaches the kernel through ``KiviLayer.lean_attend``: off, lean decoding equals
    the stock forward over the same policy; on, it differs by the rounding only."""
    from test_quantized_lean_step import decode_both

    from leanlm.kvcache.quantized import Quantized
    from leanlm.models import tiny_llama

    monkeypatch.setenv("LEANLM_KV_COMPILE", "0")
    model = tiny_llama(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32).eval()
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(5))
    policy = Quantized(bits=4, value_bits=4, group=32, residual=32)  # 16-byte rows: the integer path
    gaps, agree = {}, {}
    for integer in (False, True):
        with kernels.use_int8_attention(integer):
            steps = [(lean, stock) for lean, stock, *_ in decode_both(model, ids, policy, 30)]
        gaps[integer] = [(lean - stock).abs().max().item() for lean, stock in steps]
        agree[integer] = sum(torch.equal(lean.argmax(-1), stock.argmax(-1)) for lean, stock in steps)
    assert max(gaps[False]) < 1e-4 and agree[False] == 30
    # logits of std ~2.2; this random model's attention is far peakier than a trained one's (there the KL to
    # the uncompressed model moves by < 1%: benchmarks/kv_decode_speed.py --kernel-quality)
    assert 1e-4 < sum(gaps[True]) / 30 < 0.3 and max(gaps[True]) < 1.0 and agree[True] >= 26
