"""recover/: LoRA through peft, the KD losses against naive references, the distill loop, resume."""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from leanlm.data import find_split_file, tokenize_split
from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, tiny_llama
from leanlm.recover import (
    DistillConfig,
    LoraSettings,
    add_lora,
    distill,
    kd_loss,
    kd_loss_topk,
    merge_lora,
    plot_loss_curve,
    train_only,
    training_windows,
)
from leanlm.recover.checkpoint import latest_checkpoint
from leanlm.recover.chunked_kl import tempered_kl

SCRIPT = Path(__file__).with_name("distill_resume_script.py")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning threads
    slow them down many times over. The resume test also needs the same thread count in both processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _helper():
    spec = importlib.util.spec_from_file_location("distill_resume_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prune_layer0_to_two_heads(model: LlamaForCausalLM) -> None:
    """Keep query heads 0-1 and KV head 0 in layer 0 only: per-layer head counts, as pruning leaves them."""
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim

    def keep(linear: nn.Linear, rows: int | None = None, cols: int | None = None) -> nn.Linear:
        weight = linear.weight[:rows, :cols]
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        new.weight.data.copy_(weight)
        return new

    attn.q_proj, attn.k_proj, attn.v_proj = keep(attn.q_proj, 2 * head_dim), keep(attn.k_proj, head_dim), keep(attn.v_proj, head_dim)
    attn.o_proj = keep(attn.o_proj, cols=2 * head_dim)


def _noisy_student(seed: int = 7) -> LlamaForCausalLM:
    student = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=noise))
    return student


# ------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("pruned", [False, True])
def test_lora_merge_equals_unmerged(pruned, random_ids):
    # float64: merging reorders the sums (W x + B A x vs (W + B A) x); in float32 that alone moves
    # these logits (|max| ~ 7) by ~1e-5, which would hide a real merge error behind rounding.
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    if pruned:
        _prune_layer0_to_two_heads(model)
        assert ModelSpec.from_model(model).heads_per_layer == (2, 4)
    model.double()
    peft_model = add_lora(model, LoraSettings(rank=4, include_mlp=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapters do something
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        unmerged = peft_model(random_ids).logits
        merged_model = merge_lora(peft_model)
        merged = merged_model(random_ids).logits
    assert type(merged_model) is LlamaForCausalLM
    assert not any("lora" in name for name, _ in merged_model.named_modules())
    assert (unmerged - tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2).double()(random_ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, atol=1e-9, rtol=0)


def test_lora_targets_and_errors():
    model = add_lora(tiny_llama(), LoraSettings(include_mlp=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(LeanLMError, match="do not match"):
        add_lora(tiny_llama(), LoraSettings(targets=("no_such_proj",)))
    with pytest.raises(LeanLMError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(LeanLMError, match="add_lora"):
        merge_lora(tiny_llama())


# ---------------------------------------------------------------------------------------- losses


def _naive_kd(student, teacher, labels, alpha, temperature):
    """Per position, in float64, with hand-written softmax: the reference for kd_loss."""
    kl_sum, ce_sum, count = 0.0, 0.0, 0
    batch, seq, vocab = student.shape
    for b in range(batch):
        for t in range(seq - 1):
            label = int(labels[b, t + 1])
            if label == -100:
                continue
            s = [float(x) for x in student[b, t]]
            u = [float(x) for x in teacher[b, t]]
            zs = sum(math.exp(x / temperature) for x in s)
            zt = sum(math.exp(x / temperature) for x in u)
            q = [math.exp(x / temperature) / zs for x in s]
            p = [math.exp(x / temperature) / zt for x in u]
            kl_sum += sum(p[v] * math.log(p[v] / q[v]) for v in range(vocab))
            ce_sum += -math.log(math.exp(s[label]) / sum(math.exp(x) for x in s))
            count += 1
    kd, ce = kl_sum / count, ce_sum / count
    return alpha * temperature**2 * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.0, 1.0), (1.0, 1.0), (0.3, 4.0), (0.9, 0.5)])
def test_kd_loss_matches_naive_reference(alpha, temperature):
    generator = torch.Generator().manual_seed(3)
    student = 3 * torch.randn(2, 5, 7, generator=generator)
    teacher = 3 * torch.randn(2, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[0, 2] = labels[1, 4] = -100
    loss, parts = kd_loss(student, teacher, labels, alpha, temperature)
    ref_loss, ref_kd, ref_ce = _naive_kd(student, teacher, labels, alpha, temperature)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert parts["kd"].item() == pytest.approx(ref_kd, rel=1e-5, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ref_ce, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("chunk,temperature", [(3, 2.0), (128, 1.0), (1, 0.5)])
def test_tempered_kl_gradient_equals_autograd_of_the_plain_formula(chunk, temperature):
    """The closed-form gradient kept by the chunked KL equals autograd through two log-softmaxes (float64)."""
    generator = torch.Generator().manual_seed(5)
    student = (3 * torch.randn(11, 9, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(11, 9, generator=generator, dtype=torch.float64)
    weights = torch.rand(11, generator=generator, dtype=torch.float64)  # a non-uniform upstream gradient
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    reference = (log_p.exp() * (log_p - log_q)).sum(-1)
    (reference * weights).sum().backward()
    want = student.grad.clone()
    student.grad = None
    kl = tempered_kl(student, teacher, temperature, chunk)
    (kl * weights.float()).sum().backward()
    assert kl.dtype == torch.float32 and torch.allclose(kl.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    assert student.grad.dtype == torch.float64 and torch.allclose(student.grad, want, rtol=1e-4, atol=1e-6)
    bf16 = student.detach().bfloat16().requires_grad_()
    tempered_kl(bf16, teacher.bfloat16(), temperature, chunk).sum().backward()
    assert bf16.grad.dtype == torch.bfloat16  # the gradient comes back in the logits' own dtype
    with torch.no_grad():
        assert tempered_kl(student, teacher, temperature, chunk).grad_fn is None
    kl = tempered_kl(student, teacher, temperature, chunk)
    with pytest.raises(RuntimeError):  # a second derivative is refused, not silently wrong
        torch.autograd.grad(torch.autograd.grad(kl.sum(), student, create_graph=True)[0].sum(), student)


def test_kd_loss_limits(tiny_gqa, random_ids):
    with torch.no_grad():
        out = tiny_gqa(random_ids, labels=random_ids)
    other = torch.randn_like(out.logits)
    ce_only, _ = kd_loss(out.logits, other, random_ids, alpha=0.0, temperature=3.0)
    assert ce_only.item() == pytest.approx(out.loss.item(), abs=1e-5)
    same, parts = kd_loss(out.logits, out.logits.clone(), random_ids, alpha=1.0, temperature=2.0)
    assert abs(same.item()) < 1e-6 and abs(parts["kd"].item()) < 1e-6
    with pytest.raises(LeanLMError, match="alpha"):
        kd_loss(out.logits, other, random_ids, alpha=1.5)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (1.0, 1.0)])
def test_topk_with_full_vocab_equals_kd_loss(alpha, temperature):
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(2, 6, 11, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    top = teacher.topk(11, dim=-1)
    full, full_parts = kd_loss(student, teacher, labels, alpha, temperature)
    cached, cached_parts = kd_loss_topk(student, top.values, top.indices.int(), labels, alpha, temperature)
    torch.testing.assert_close(cached, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cached_parts["kd"], full_parts["kd"], atol=1e-6, rtol=1e-6)
    # A smaller k keeps the value non-negative (it is a KL against the truncated teacher).
    top3 = teacher.topk(3, dim=-1)
    assert kd_loss_topk(student, top3.values, top3.indices, labels, 1.0, temperature)[0].item() >= 0


# ----------------------------------------------------------------------------------------- loop


def _kd_on(model, teacher, ids) -> float:
    with torch.no_grad():
        return kd_loss(model(ids).logits, teacher(ids).logits, ids, alpha=1.0, temperature=1.0)[1]["kd"].item()


@pytest.mark.parametrize("top_k,bf16", [(0, True), (32, False)])
def test_distill_reduces_kd_loss(tmp_path, top_k, bf16):
    teacher = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    student = add_lora(_noisy_student(), LoraSettings(rank=8))
    windows = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    config = DistillConfig(
        steps=15, batch_size=4, seq_len=32, lr=2e-2, warmup_steps=2, alpha=1.0, temperature=1.0,
        eval_every=15, checkpoint_every=0, top_k_teacher=top_k, bf16=bf16,
    )  # fmt: skip
    result = distill(student, teacher, windows, config, tmp_path, eval_fn=lambda model: _kd_on(model, teacher, windows))
    (start_step, before), (end_step, after) = result.eval_curve
    assert (start_step, end_step, result.steps_done) == (0, 15, 15)
    # The objective on the training windows (random tokens: this checks the optimisation, not generalisation).
    assert after < 0.8 * before, (before, after)
    assert result.checkpoint and Path(result.checkpoint).name == "step-000015"
    assert (result.teacher_cache_seconds > 0) == (top_k > 0) and result.bf16 == bf16
    assert not hasattr(student.forward, "__wrapped__")  # accelerate's autocast wrapper was removed
    plot_loss_curve(result, tmp_path / "plots" / "loss.png")
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    helper = _helper()
    student, teacher, windows, config = helper.build()
    full = distill(student, teacher, windows, config, tmp_path / "a")

    log = open(tmp_path / "killed.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), str(tmp_path / "b"), "4"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        line = proc.stdout.readline().strip()
    finally:
        proc.kill()  # SIGKILL: no cleanup, no final checkpoint
        proc.wait()
        watchdog.cancel()
        log.close()
    assert line == "checkpoint 4", (tmp_path / "killed.log").read_text()[-2000:]
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"

    student_b, teacher_b, windows_b, config_b = helper.build()
    resumed = distill(student_b, teacher_b, windows_b, config_b, tmp_path / "b", resume=True)
    assert resumed.resumed_from == 4 and resumed.steps_done == 6
    assert resumed.losses == full.losses  # bit-exact, step by step
    params_a = {n: p for n, p in student.named_parameters() if p.requires_grad}
    params_b = {n: p for n, p in student_b.named_parameters() if p.requires_grad}
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)


def test_resume_refuses_other_settings_and_fresh_run_refuses_old_checkpoint(tmp_path):
    helper = _helper()
    student, teacher, windows, config = helper.build()
    config.steps = 2
    distill(student, teacher, windows, config, tmp_path)
    with pytest.raises(LeanLMError, match="already holds a checkpoint"):
        distill(student, teacher, windows, config, tmp_path)
    config.lr = 1e-3
    with pytest.raises(LeanLMError, match="differs in lr"):
        distill(student, teacher, windows, config, tmp_path, resume=True)


def test_max_minutes_stops_early_with_a_checkpoint(tmp_path):
    student, teacher, windows, config = _helper().build()
    config.max_minutes = 1e-6
    result = distill(student, teacher, windows, config, tmp_path)
    assert result.stopped_early and result.steps_done == 1
    assert Path(result.checkpoint).name == "step-000001"


def test_max_cpu_minutes_counts_process_cpu_time_and_survives_resume(tmp_path):
    student, teacher, windows, config = _helper().build()
    config.max_cpu_minutes = 1e-6
    result = distill(student, teacher, windows, config, tmp_path)
    assert result.stopped_early and result.steps_done == 1
    assert 0 < result.cpu_seconds < 600
    config.max_cpu_minutes = 1e3
    resumed = distill(student, teacher, windows, config, tmp_path, resume=True)
    assert resumed.steps_done == config.steps and not resumed.stopped_early
    assert resumed.cpu_seconds > result.cpu_seconds  # the first session's CPU time is carried over
    with pytest.raises(LeanLMError, match="max_cpu_minutes must be positive"):
        DistillConfig(max_cpu_minutes=0).check()


def test_train_only_and_kd_without_lora(tmp_path):
    student, teacher = _noisy_student(), tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    names = train_only(student, ["o_proj"])
    assert names == ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    assert [n for n, p in student.named_parameters() if p.requires_grad] == names
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    distill(student, teacher, windows, DistillConfig(steps=2, batch_size=2, seq_len=16, lr=1e-2), tmp_path)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)
    with pytest.raises(LeanLMError, match="matches no parameter"):
        train_only(student, ["o_proj", "typo_proj"])
    student.requires_grad_(False)
    with pytest.raises(LeanLMError, match="no trainable parameters"):
        distill(student, teacher, windows, DistillConfig(steps=1, batch_size=2, seq_len=16), tmp_path / "x")


def test_distill_input_errors(tmp_path):
    student, teacher, windows, config = _helper().build()
    with pytest.raises(LeanLMError, match="seq_len"):
        distill(student, teacher, windows[:, :8], config, tmp_path)
    with pytest.raises(LeanLMError, match="separate model"):
        distill(student, student, windows, config, tmp_path)
    with pytest.raises(LeanLMError, match="eval_fn"):
        distill(student, teacher, windows, DistillConfig(seq_len=16, eval_every=2), tmp_path)


# ----------------------------------------------------------------------------------------- data


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


@pytest.mark.skipif(find_split_file("validation") is None, reason="WikiText-2 validation not on disk")
def test_training_windows_come_from_validation_only():
    assert "split" not in inspect.signature(training_windows).parameters
    tokenizer = _CharTokenizer()
    windows = training_windows(tokenizer, seq_len=64, limit=5)
    stream = tokenize_split(tokenizer, "validation")
    assert windows.shape == (5, 64) and windows.dtype == torch.long
    assert torch.equal(windows.flatten(), stream[: 5 * 64])
    assert len(training_windows(tokenizer, seq_len=4096)) == len(stream) // 4096
