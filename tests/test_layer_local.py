"""Layer-local fitting: captured calls replay exactly; Adam and least squares reduce held-out error."""

import copy

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.models.arch import arch_of
from leanlm.models.tiny import tiny_llama, tiny_qwen2
from leanlm.recover.layer_local import (
    LocalFitConfig, capture_attention_io, fit_linear_lstsq, fit_module, linear_inputs, relative_error,
)


def _windows(count=12, seq=16, seed=0):
    return torch.randint(0, 256, (count, seq), generator=torch.Generator().manual_seed(seed))


def _damaged(teacher, layer, scale=0.5, seed=1):
    """A copy of ``teacher`` whose layer's o_proj is perturbed (as pruning or merging would leave it)."""
    student = copy.deepcopy(teacher)
    o_proj = arch_of(student).attention(layer).o_proj
    noise = torch.randn(o_proj.weight.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        o_proj.weight.add_(scale * o_proj.weight.std() * noise)
    return student


def test_capture_replays_the_original_exactly():
    teacher = tiny_llama(num_layers=2, num_kv_heads=2)
    io = capture_attention_io(teacher, _windows(), layers=[0, 1], batch_size=4)
    assert sorted(io) == [0, 1] and len(io[1].calls) == 3  # 12 windows in micro-batches of 4
    assert io[1].outputs[0].shape == (4, 16, 64)
    assert relative_error(arch_of(teacher).attention(1).module, io[1], range(3)) < 1e-12


def test_adam_fit_reduces_heldout_error_and_touches_only_the_layer():
    teacher = tiny_llama(num_layers=2, num_kv_heads=2)
    io = capture_attention_io(teacher, _windows(16), layers=[1])
    student = _damaged(teacher, 1)
    view = arch_of(student).attention(1)
    untouched = {n: p.clone() for n, p in student.named_parameters() if ".layers.1.self_attn.o_proj" not in n}
    result = fit_module(view.module, io[1], LocalFitConfig(steps=60, lr=3e-3), params=[view.o_proj.weight])
    assert result.heldout_before > 0.05
    assert result.heldout_after < 0.2 * result.heldout_before
    assert result.after < result.before
    assert all(torch.equal(p, untouched[n]) for n, p in student.named_parameters() if n in untouched)


def test_least_squares_on_o_proj_recovers_the_original_map():
    teacher = tiny_qwen2(num_layers=2)  # o_proj without bias, q/k/v with: the hooks see the real o_proj input
    io = capture_attention_io(teacher, _windows(8), layers=[0])
    student = _damaged(teacher, 0, scale=1.0)
    view = arch_of(student).attention(0)
    assert relative_error(view.module, io[0], range(2)) > 0.1
    error = fit_linear_lstsq(view.o_proj, linear_inputs(view.module, view.o_proj, io[0]), io[0].outputs, ridge=1e-9)
    assert error < 1e-8
    assert relative_error(view.module, io[0], range(2)) < 1e-8


def test_bf16_module_is_fitted_in_float32_and_returned_in_bf16():
    teacher = tiny_llama(num_layers=1).to(torch.bfloat16)
    io = capture_attention_io(teacher, _windows(8), layers=[0], batch_size=2)
    student = _damaged(copy.deepcopy(teacher).float(), 0).to(torch.bfloat16)
    view = arch_of(student).attention(0)
    attention = view.module
    result = fit_module(attention, io[0], LocalFitConfig(steps=30, lr=3e-3), params=[view.o_proj.weight])
    assert next(attention.parameters()).dtype == torch.bfloat16
    assert result.heldout_after < result.heldout_before


def test_bad_inputs_are_one_sentence_errors():
    teacher = tiny_llama(num_layers=2)
    with pytest.raises(LeanLMError, match="do not exist"):
        capture_attention_io(teacher, _windows(), layers=[2])
    with pytest.raises(LeanLMError, match="non-empty"):
        capture_attention_io(teacher, torch.zeros(0, 4, dtype=torch.long), layers=[0])
    io = capture_attention_io(teacher, _windows(4), layers=[0], batch_size=4)
    with pytest.raises(LeanLMError, match="leave none to fit"):
        fit_module(arch_of(teacher).attention(0).module, io[0], LocalFitConfig(heldout_fraction=0.9))
    with pytest.raises(LeanLMError, match="steps"):
        LocalFitConfig(steps=0).check()
