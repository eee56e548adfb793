"""Does a compressed student still behave like its teacher? Greedy agreement, divergence, KL, accuracy.

For each prompt both models decode greedily (``leanlm.engine.decode.generate``, the one decode loop)
for ``new_tokens`` tokens. Then:
- agreement: share of steps where the student's token equals the teacher's (position by position);
- first divergence: tokens the two outputs share before they first differ (``new_tokens`` if never);
- per-step KL(teacher || student), teacher-forced on the teacher's greedy output (both models read
  prompt + the teacher's tokens in one forward; the student is never judged on its own drift), and the
  student's teacher-forced top-1 agreement;
- accuracy of each model where the prompt has an answer checked by code (``families.check_answer``).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from leanlm.engine.decode import generate, left_pad
from leanlm.errors import LeanLMError
from leanlm.evaluate.probe.families import FAMILIES, ProbePrompt, check_answer, read_answer
from leanlm.models.widen import widened_linears


@dataclass
class ProbeConfig:
    """Settings of a probe run (saved with its results)."""

    families: tuple[str, ...] = field(default=tuple(FAMILIES), metadata={"help": "procedural prompt families"})
    per_family: int = field(default=8, metadata={"help": "prompts per family"})
    shots: int = field(default=2, metadata={"help": "solved examples of the same family before each prompt"})
    new_tokens: int = field(default=64, metadata={"help": "greedy tokens decoded per prompt"})
    seed: int = field(default=0, metadata={"help": "seed of the prompts (same seed, same prompts)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per batch (left-padded)"})
    chat: bool = field(default=False, metadata={"help": "wrap prompts in the tokenizer's chat template"})
    continuations: int = field(default=8, metadata={"help": "held-out passages per text"})
    continuation_tokens: int = field(default=48, metadata={"help": "prompt tokens of each held-out passage"})

    def check(self) -> None:
        for name in ("per_family", "new_tokens", "batch_size", "continuation_tokens"):
            if getattr(self, name) < 1:
                raise LeanLMError(f"probe {name.replace('_', ' ')} must be positive, got {getattr(self, name)}")
        if self.continuations < 0:
            raise LeanLMError(f"probe continuations must not be negative, got {self.continuations}")


def encode(prompts: list[ProbePrompt], tokenizer, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt (through the chat template when ``chat``)."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise LeanLMError("--chat needs a tokenizer with a chat template; this one has none")
    out = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt.text)["input_ids"]
        out.append(list(ids))
    return out


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def greedy_outputs(model: nn.Module, prompts: list[list[int]], new_tokens: int, batch_size: int) -> torch.Tensor:
    """(num_prompts, new_tokens) greedy tokens, decoded in left-padded batches through the engine's loop."""
    device = next(model.parameters()).device
    rows = []
    for batch in _batches(prompts, batch_size):
        ids, mask = left_pad(batch, device=device)  # (batch, longest) each
        rows.append(generate(model, ids, new_tokens, attention_mask=mask).cpu())  # (batch, new_tokens)
    return torch.cat(rows)


@torch.no_grad()
def forced_log_probs(model: nn.Module, prompts: list[list[int]], continuation: torch.Tensor) -> torch.Tensor:
    """(batch, steps, vocab) float32 log-probs of each continuation token, reading prompt + continuation."""
    steps = continuation.shape[1]
    seqs = [p + c[:-1] for p, c in zip(prompts, continuation.tolist())]
    device = next(model.parameters()).device
    ids, mask = left_pad(seqs, device=device)  # (batch, longest)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (batch, longest): pads do not shift real positions
    with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones
        logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=steps).logits
    return torch.log_softmax(logits.float(), dim=-1)  # (batch, steps, vocab)


def forced_kl(teacher: nn.Module, student: nn.Module, prompts: list[list[int]], continuation: torch.Tensor,
              batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step KL(teacher || student) and student top-1 == continuation token, both (num_prompts, steps)."""
    kls, top1 = [], []
    for start in range(0, len(prompts), batch_size):
        part, cont = prompts[start : start + batch_size], continuation[start : start + batch_size]
        log_t = forced_log_probs(teacher, part, cont)  # (batch, steps, vocab)
        log_s = forced_log_probs(student, part, cont)
        kls.append((log_t.exp() * (log_t - log_s)).sum(-1).clamp(min=0).cpu())  # (batch, steps)
        top1.append((log_s.argmax(-1).cpu() == cont))
    return torch.cat(kls), torch.cat(top1)


def compare(teacher_tokens: torch.Tensor, student_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Position-wise matches, 'identical so far' and the first divergent step, from (n, steps) tokens."""
    match = teacher_tokens == student_tokens  # (n, steps)
    prefix = match.long().cumprod(dim=1).bool()  # (n, steps): every token up to here identical
    return {"match": match, "prefix": prefix, "first_divergence": prefix.sum(dim=1)}


def decode_text(tokenizer, tokens: list[int]) -> str:
    """Output text up to the first end-of-sequence token."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass
class StudentOutputs:
    tokens: torch.Tensor  # (n, steps) greedy tokens
    texts: list[str]


def model_outputs(model, tokenizer, prompts: list[ProbePrompt], ids: list[list[int]], config: ProbeConfig) -> StudentOutputs:
    tokens = greedy_outputs(model, ids, config.new_tokens, config.batch_size)
    return StudentOutputs(tokens, [decode_text(tokenizer, row) for row in tokens.tolist()])


def _group_summary(rows: list[int], prompts, cmp, kl, top1, teacher: StudentOutputs, student: StudentOutputs) -> dict:
    index = torch.tensor(rows)
    first = cmp["first_divergence"][index].float()
    summary = {
        "prompts": len(rows),
        "agreement": float(cmp["match"][index].float().mean()),
        "first_divergence_mean": float(first.mean()),
        "first_divergence_median": float(statistics.median(first.tolist())),
        "identical_outputs": float((first == cmp["match"].shape[1]).float().mean()),
        "kl_mean": float(kl[index].mean()),
        "forced_top1": float(top1[index].float().mean()),
    }
    graded = [r for r in rows if prompts[r].answer is not None]
    if graded:
        summary["accuracy_teacher"] = sum(bool(check_answer(prompts[r], teacher.texts[r])) for r in graded) / len(graded)
        summary["accuracy_student"] = sum(bool(check_answer(prompts[r], student.texts[r])) for r in graded) / len(graded)
    return summary


def summarize(prompts: list[ProbePrompt], teacher: StudentOutputs, student: StudentOutputs, kl: torch.Tensor,
              top1: torch.Tensor) -> dict:
    """Per-family and overall numbers, per-step curves, per-prompt records, families ranked by departure."""
    cmp = compare(teacher.tokens, student.tokens)
    families = list(dict.fromkeys(p.family for p in prompts))
    by_family = {f: _group_summary([i for i, p in enumerate(prompts) if p.family == f], prompts, cmp, kl, top1,
                                   teacher, student) for f in families}
    overall = _group_summary(list(range(len(prompts))), prompts, cmp, kl, top1, teacher, student)
    curves = {
        "token_agreement": cmp["match"].float().mean(0).tolist(),  # per step
        "identical_so_far": cmp["prefix"].float().mean(0).tolist(),
        "kl": kl.mean(0).tolist(),
    }
    records = [{
        "family": p.family, "prompt": p.text, "answer": p.answer,
        "teacher_output": teacher.texts[i], "student_output": student.texts[i],
        "teacher_answer": read_answer(p, teacher.texts[i]) if p.answer else None,
        "student_answer": read_answer(p, student.texts[i]) if p.answer else None,
        "first_divergence": int(cmp["first_divergence"][i]), "kl_mean": float(kl[i].mean()),
    } for i, p in enumerate(prompts)]  # fmt: skip
    ranked = sorted(families, key=lambda f: (by_family[f]["agreement"], -by_family[f]["kl_mean"]))
    return {"overall": overall, "families": by_family, "departs_most": ranked, "curves": curves, "prompts": records}


def probe(teacher: nn.Module, students: dict[str, nn.Module], tokenizer, prompts: list[ProbePrompt],
          config: ProbeConfig) -> dict:
    """Probe every student against the teacher on the same prompts (the teacher decodes once)."""
    config.check()
    if not prompts:
        raise LeanLMError("the probe has no prompts")
    ids = encode(prompts, tokenizer, config.chat)
    teacher_out = model_outputs(teacher, tokenizer, prompts, ids, config)
    results = {"config": asdict(config), "num_prompts": len(prompts), "students": {}}
    graded = [i for i, p in enumerate(prompts) if p.answer is not None]
    results["teacher_accuracy"] = (sum(bool(check_answer(prompts[i], teacher_out.texts[i])) for i in graded) / len(graded)
                                   if graded else None)
    for label, student in students.items():
        out = model_outputs(student, tokenizer, prompts, ids, config)
        kl, top1 = forced_kl(teacher, student, ids, teacher_out.tokens, config.batch_size)
        results["students"][label] = summarize(prompts, teacher_out, out, kl, top1)
    return results
