"""leanlm's CPU decode kernels (engine/kernels) against float64 references, and StreamingLinear as a
drop-in nn.Linear: same parameters and keys, ATen for prefill and training, the kernel for decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanlm.engine import generate, kernels, static_cache
from leanlm.engine.streaming_linear import (StreamingLinear, disable_streaming_linears, enable_streaming_linears,
                                           native_bf16_matmul)
from leanlm.models import tiny_llama

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="leanlm's CPU kernels cannot be built here")


def bound(x: torch.Tensor, w: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding of the result (2^-8 relative) plus float32 accumulation error."""
    return reference.abs() * 2**-8 + 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("in_features", [64, 72])  # 72: not a multiple of the 32-wide split (AVX2 path only)
@pytest.mark.parametrize("avx512", [True, False])  # AVX512-BF16 dot products where the CPU has them, or AVX2 FMAs
def test_bf16_kernel_matches_a_float64_reference(rows, in_features, avx512):
    if avx512 and not kernels.has_avx512(bf16=True):
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(rows * in_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(37, in_features, generator=gen).bfloat16()  # 37 rows: not a multiple of the 32-row block
    b = torch.randn(37, generator=gen).bfloat16()
    with kernels.use_avx512(avx512):
        got = torch.ops.leanlm.linear_bf16(x, w, b)
    reference = x.double() @ w.double().T + b.double()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 37)
    assert ((got.double() - reference).abs() <= bound(x, w, reference)).all()


@needs_kernels
def test_the_avx512_path_is_taken_where_the_cpu_has_it():
    """vdpbf16ps flushes denormal inputs to zero, the AVX2 FMAs do not: a denormal x tells the paths apart."""
    if not kernels.has_avx512(bf16=True):
        pytest.skip("this CPU has no AVX512-BF16")
    x = torch.full((1, 64), 1e-39).bfloat16()  # below bf16's smallest normal (1.2e-38)
    w = torch.full((3, 64), 1e30).bfloat16()
    with kernels.use_avx512(False):
        widened = torch.ops.leanlm.linear_bf16(x, w, None).float()
    torch.testing.assert_close(widened, (x.double() @ w.double().T).float(), rtol=2**-7, atol=0)  # ~6.4e-8
    assert (torch.ops.leanlm.linear_bf16(x, w, None) == 0).all()


@needs_kernels
def test_kernel_keeps_leading_dimensions_and_rejects_a_bad_weight():
    x = torch.randn(2, 1, 64).bfloat16()
    w = torch.randn(16, 64).bfloat16()
    assert torch.ops.leanlm.linear_bf16(x, w, None).shape == (2, 1, 16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.leanlm.linear_bf16(x, w.float(), None)


def bf16_model():
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2).to(torch.bfloat16).eval()


@needs_kernels
def test_streaming_linears_keep_parameters_and_state_dict():
    model = bf16_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert enable_streaming_linears(model) == linears > 0
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    disable_streaming_linears(model)
    assert not any(isinstance(m, StreamingLinear) for m in model.modules())


@needs_kernels
def test_streaming_linear_uses_aten_for_prefill_and_training():
    layer = nn.Linear(64, 24).bfloat16()
    reference = nn.Linear(64, 24).bfloat16()
    reference.load_state_dict(layer.state_dict())
    enable_streaming_linears(layer)
    x = torch.randn(2, 17, 64).bfloat16()  # 34 rows > 16: prefill-sized, ATen's GEMM (float32 where bf16 is emulated)
    widened = F.linear(x.float(), reference.weight.float(), reference.bias.float()).bfloat16()
    want = F.linear(x, reference.weight, reference.bias) if native_bf16_matmul() else widened
    assert torch.equal(layer(x), want)
    assert (widened.float() - F.linear(x, reference.weight, reference.bias).float()).abs().max() <= 0.02 * widened.abs().max()
    small = torch.randn(1, 64).bfloat16()
    layer(small).float().sum().backward()  # grad enabled + trainable weight: ATen, so autograd works
    reference(small).float().sum().backward()
    assert torch.equal(layer.weight.grad, reference.weight.grad)


@needs_kernels
def test_engine_decode_through_the_kernel_matches_aten_logits():
    model = bf16_model()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with kernels.use_kernels(False):
            aten = model(ids).logits[:, -1].float()
        enable_streaming_linears(model)
        rows = model(ids[:, :8]).logits  # 16 rows: the kernel
        step = model(ids).logits[:, -1].float()  # 18 rows: ATen
        one = torch.stack([model(ids[i:i + 1]).logits[0, -1] for i in range(2)]).float()  # 9 rows: kernel
    assert rows.shape[1] == 8
    assert (step - aten).abs().max() <= 0.05 * aten.abs().max()  # 18 rows: ATen (widened to float32 on AVX2)
    assert (one - aten).abs().max() <= 0.05 * aten.abs().max()
    tokens = generate(model, ids, 4, cache=static_cache(model, 13))
    assert tokens.shape == (2, 4)


@needs_kernels
def test_compiled_step_calls_the_kernel_op():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable in this torch")
    layer = nn.Linear(64, 24).bfloat16()
    enable_streaming_linears(layer)
    x = torch.randn(1, 64).bfloat16()
    with torch.inference_mode():
        assert torch.equal(torch.compile(layer, dynamic=False)(x), layer(x))


def test_switched_off_kernels_leave_the_model_alone():
    model = bf16_model()
    with kernels.use_kernels(False):
        assert enable_streaming_linears(model) == 0
    assert not any(isinstance(m, StreamingLinear) for m in model.modules())


def test_prefill_sized_bf16_calls_are_widened_where_bf16_is_emulated(monkeypatch):
    """Without native bf16 GEMM, >16-row calls run in float32, rounded once (under autograd too: gradients
    go through the casts); with it, or decode-sized, the GEMM runs in bf16 as before (the dtypes F.linear
    sees are checked: ATen's bf16 GEMM may round to the very same values)."""
    from types import SimpleNamespace

    from leanlm.models import widen

    seen = []

    def spy(x, weight, bias=None):
        seen.append((x.dtype, weight.dtype))
        return F.linear(x, weight, bias)

    monkeypatch.setattr(widen, "F", SimpleNamespace(linear=spy))
    layer = nn.Linear(64, 24).bfloat16()
    layer.__class__ = StreamingLinear  # the swap enable_streaming_linears makes
    x = torch.randn(40, 64).bfloat16()
    widened = F.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    monkeypatch.setitem(widen._native_bf16, "cpu", False)
    with torch.no_grad():
        assert torch.equal(layer(x), widened) and seen.pop() == (torch.float32, torch.float32)
        with kernels.use_kernels(False):  # decode-sized: never widened
            layer(x[:16])
        assert seen.pop() == (torch.bfloat16, torch.bfloat16)
    out = layer(x)  # grad enabled, trainable weight: widened, autograd intact
    assert seen.pop() == (torch.float32, torch.float32) and out.requires_grad
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and layer.weight.grad.abs().sum() > 0
    monkeypatch.setitem(widen._native_bf16, "cpu", True)
    with torch.no_grad():
        layer(x)
    assert seen.pop() == (torch.bfloat16, torch.bfloat16)
