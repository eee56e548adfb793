"""models/widen.py: bf16 linears whose many-row products run in float32 where the CPU has no bf16 GEMM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanlm.data import nonoverlapping_windows
from leanlm.evaluate import token_nll
from leanlm.models import tiny_llama, widen
from leanlm.models.widen import WideLinear, widened_linears
from leanlm.recover import DistillConfig, LoraSettings, add_lora, distill


@pytest.fixture
def emulated_bf16(monkeypatch):
    """Act as an AVX2 CPU (no oneDNN bf16 GEMM) and record the dtypes every widened-module GEMM sees."""
    seen = []

    def spy(x, weight, bias=None):
        seen.append((x.dtype, weight.dtype, torch.is_grad_enabled()))
        return F.linear(x, weight, bias)

    monkeypatch.setitem(widen._native_bf16, "cpu", False)
    monkeypatch.setattr(widen, "F", SimpleNamespace(linear=spy))
    return seen


def bf16_llama(seed: int = 0):
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, seed=seed).to(torch.bfloat16)


def test_widened_block_swaps_and_restores_every_bf16_linear(emulated_bf16):
    model = bf16_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits.float()
        with widened_linears(model, None) as count:
            assert count == linears > 0 and all(type(m) is not nn.Linear for m in model.modules())
            wide = model(ids).logits.float()
    # 40 rows > 16: every projection ran in float32 (7 per layer + the output head), rounded to bf16 once.
    assert emulated_bf16 and all(d == (torch.float32, torch.float32, False) for d in emulated_bf16)
    assert len(emulated_bf16) == 7 * 2 + 1
    assert (wide - plain).abs().max() <= 0.03 * plain.abs().max()  # the same bf16 model, other rounding
    assert sum(type(m) is nn.Linear for m in model.modules()) == linears
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_decode_sized_calls_stay_bf16(emulated_bf16):
    layer = nn.Linear(64, 24).bfloat16()
    with torch.no_grad(), widened_linears(layer):
        layer(torch.randn(16, 64).bfloat16())
        assert emulated_bf16.pop() == (torch.bfloat16, torch.bfloat16, False)
        out = layer(torch.randn(17, 64).bfloat16())
        assert emulated_bf16.pop() == (torch.float32, torch.float32, False) and out.dtype == torch.bfloat16


def test_nothing_is_widened_with_native_bf16_or_float32(monkeypatch):
    monkeypatch.setitem(widen._native_bf16, "cpu", True)
    with widened_linears(bf16_llama()) as count:
        assert count == 0
    monkeypatch.setitem(widen._native_bf16, "cpu", False)
    with widened_linears(tiny_llama(num_layers=1)) as count:  # float32 weights: nothing to widen
        assert count == 0


def test_gradients_flow_through_the_widened_gemm(emulated_bf16):
    layer = nn.Linear(64, 24).bfloat16()
    x = torch.randn(40, 64).bfloat16().requires_grad_()
    with widened_linears(layer):
        assert type(layer) is WideLinear
        layer(x).float().square().sum().backward()
    assert emulated_bf16.pop() == (torch.float32, torch.float32, True)
    # The reference: the same float32 product written out, its gradients rounded to bf16 at the leaves.
    x_ref, w_ref = x.detach().clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    F.linear(x_ref.float(), w_ref.float(), layer.bias.float()).bfloat16().float().square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.weight.grad, w_ref.grad)


def test_perplexity_and_distillation_run_widened(emulated_bf16, tmp_path):
    teacher = bf16_llama()
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1))
    total, count, _ = token_nll(teacher, ids, nonoverlapping_windows(96, 48))
    assert count == 94 and (torch.float32, torch.float32, False) in emulated_bf16
    assert all(type(m) is not WideLinear for m in teacher.modules())  # restored after the evaluation
    emulated_bf16.clear()
    student = add_lora(bf16_llama(seed=1), LoraSettings(rank=4))  # not the teacher: KL > 0
    lora_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    config = DistillConfig(steps=2, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=1, alpha=1.0, checkpoint_every=0)
    distill(student, teacher, windows, config, tmp_path)
    # The student's bf16 base projections ran widened under autograd (64 rows), the teacher's without.
    assert (torch.float32, torch.float32, True) in emulated_bf16 and (torch.float32, torch.float32, False) in emulated_bf16
    assert any(not torch.equal(p, lora_before[n]) for n, p in student.named_parameters() if n in lora_before)
    assert not any(type(m) is WideLinear for m in [*student.modules(), *teacher.modules()])


def test_blocks_restore_after_errors_and_nest(emulated_bf16):
    from leanlm.engine import kernels

    assert widen.MIN_ROWS == kernels.MAX_ROWS  # no band of row counts that neither the kernel nor widening takes
    model = bf16_llama()
    with pytest.raises(RuntimeError, match="inside"):
        with widened_linears(model):
            raise RuntimeError("inside")
    assert not any(type(m) is WideLinear for m in model.modules())
    with widened_linears(model) as outer:
        with widened_linears(model) as inner:  # already wide: nothing more to swap, nothing undone on exit
            assert outer > 0 and inner == 0
        assert all(type(m) is not nn.Linear for m in model.modules())
    assert not any(type(m) is WideLinear for m in model.modules())


def test_autocast_leaves_the_gemm_to_autocast(emulated_bf16):
    layer = nn.Linear(64, 24).bfloat16()
    with torch.no_grad(), widened_linears(layer), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(40, 64).bfloat16())
    assert emulated_bf16.pop()[:2] == (torch.bfloat16, torch.bfloat16)  # not widened: autocast would undo it


def _score_block_influence(model, batches):
    from leanlm.transforms.prune_layers import block_influence
    return block_influence(model, batches)


def _score_mlp_channels(model, batches):
    from leanlm.transforms.prune_mlp import channel_scores
    return channel_scores(model, batches)


def _awq_inputs(model, batches):
    from leanlm.transforms.quantize.awq import collect_inputs
    return collect_inputs(model, batches, sample_tokens=16)


def _attention_moments(model, batches):
    from leanlm.transforms.share_kv.calibration import attention_input_moments
    return attention_input_moments(model, batches, [0, 1])


def _kv_plan_probes(model, batches):
    from leanlm.analyze.kv_plan import layer_probes
    return layer_probes(model, batches)


@pytest.mark.parametrize("score", [_score_block_influence, _score_mlp_channels, _awq_inputs, _attention_moments,
                                   _kv_plan_probes])
def test_calibration_passes_run_widened_and_restore(emulated_bf16, score):
    """Layer / MLP-channel scoring, AWQ's and KV merging's calibration passes and the KV plan's probes take
    the float32 GEMM for many-row calls, and leave plain nn.Linear modules behind."""
    model = bf16_llama()
    batches = [torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    linears = sum(type(m) is nn.Linear for m in model.modules())
    model.config._attn_implementation = "sdpa"
    score(model, batches)
    assert (torch.float32, torch.float32, False) in emulated_bf16
    assert model.config._attn_implementation == "sdpa"  # the widened attention name is undone too
    assert sum(type(m) is nn.Linear for m in model.modules()) == linears
    assert not any(type(m) is WideLinear for m in model.modules())


def test_attention_is_widened_for_many_queries_and_restored(emulated_bf16, monkeypatch):
    """Within the block a bf16 sdpa model's attention runs in float32 for prefill-sized calls (the output
    rounded to bf16), stays bf16 for a decode step, and the config names sdpa again afterwards."""
    seen = []
    real = widen.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, query.shape[-2]))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(widen, "sdpa_attention_forward", spy)
    model = bf16_llama()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits.float()
        assert not seen  # outside the block: transformers' own sdpa function, not the widened one
        with widened_linears(model):
            assert model.config._attn_implementation == widen.WIDE_ATTENTION
            wide = model(ids).logits.float()
            assert seen == [(torch.float32,) * 3 + (20,)] * 2  # both layers, 20 queries: widened
            seen.clear()
            out = model(ids[:, :1], use_cache=False).logits
            assert seen == [(torch.bfloat16,) * 3 + (1,)] * 2 and out.dtype == torch.bfloat16  # one query: bf16
    assert model.config._attn_implementation == "sdpa"
    assert (wide - plain).abs().max() <= 0.03 * plain.abs().max()


def test_attention_name_is_restored_after_an_error(emulated_bf16):
    model = bf16_llama()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with widened_linears(model):
            assert model.config._attn_implementation == widen.WIDE_ATTENTION
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
