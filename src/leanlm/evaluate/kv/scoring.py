"""Scoring a protocol's windows: NLL, exact KL to the uncompressed run (``UncompressedReference``), bytes."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanlm.errors import LeanLMError
from leanlm.evaluate.kv.common import SCORE_SLICE, PolicyArg, describe_policy, output_logits, resolve_policy


@dataclass
class Scores:
    """Running sums over scored positions."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, other: Scores) -> None:
        self.nll, self.kl = self.nll + other.nll, self.kl + other.kl
        self.agree, self.count = self.agree + other.agree, self.count + other.count


def score_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, ref_hidden: torch.Tensor | None = None) -> Scores:
    """NLL of ``targets`` and, against ``ref_hidden``, sum of KL(p_ref || p) and top-1 agreement.

    hidden, ref_hidden: (n, hidden_size); targets: (n,). Slices keep the float32 log-probs small.
    """
    scores = Scores(count=len(targets))
    targets = targets.to(hidden.device)
    for start in range(0, len(targets), SCORE_SLICE):
        end = start + SCORE_SLICE
        logp = F.log_softmax(output_logits(model, hidden[start:end]).float(), dim=-1)  # (slice, vocab)
        scores.nll -= logp.gather(1, targets[start:end, None]).sum().item()
        if ref_hidden is not None:
            ref_logp = F.log_softmax(output_logits(model, ref_hidden[start:end]).float(), dim=-1)  # (slice, vocab)
            scores.kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()  # sum p_ref (log p_ref - log p)
            scores.agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
    return scores


@dataclass
class WindowRun:
    hidden: torch.Tensor  # (scored, hidden_size): the states that predict `targets`
    targets: torch.Tensor  # (scored,)
    nbytes: int  # resident cache bytes at the protocol's measuring point (a two-tier cache: its fast tier)
    peak: int
    total: int  # fast + slow tier bytes at the same point


@dataclass
class KVQualityResult:
    """Quality and measured bytes of one policy under the streaming or the continuation protocol."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    kl: float | None  # mean KL(p_uncompressed || p_policy) per scored position, nats; None without a reference
    top1_agreement: float | None  # share of scored positions whose argmax matches the uncompressed run
    reference_perplexity: float | None  # the uncompressed run's perplexity on the same positions
    bytes_per_token: float  # mean over windows of resident cache bytes / tokens (see each protocol); fast tier
    total_bytes_per_token: float  # the same with a two-tier cache's slow tier added (= bytes_per_token otherwise)
    reference_bytes_per_token: float | None
    peak_bytes: int  # max over windows of the cache's peak bytes (incl. transient dequantized copies)
    window_nll: list[float]  # mean NLL of each window, in order
    policy: dict
    protocol: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UncompressedReference:
    """The uncompressed run of a protocol, kept to score many policies against (see the module doc).

    ``hidden[i]`` holds window i's final hidden states at the scored positions, (scored, hidden_size),
    in the model dtype: the exact reference log-probs are ``log_softmax(lm_head(hidden[i]))``, rebuilt
    with the output head of the model being scored, so that head must be the reference model's
    (checked by ``head``). A model changed elsewhere (pruned layers, a new cache) may be scored
    against it: its KL is then to the original model.
    """

    kind: str  # "streaming" | "continuation"
    protocol: dict
    windows: list[torch.Tensor]  # each window's token ids, 1-D (checked against the policy run)
    hidden: list[torch.Tensor]
    result: KVQualityResult  # the uncompressed run itself (a baseline row for free)
    head: tuple  # fingerprint of the output head (shape, sum of a few rows)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def head_fingerprint(model) -> tuple:
    weight = model.get_output_embeddings().weight.detach()  # (vocab, hidden)
    return tuple(weight.shape), float(weight[:64].float().sum())


def _check_reference(model, reference: UncompressedReference, kind: str, record: dict,
                     windows: list[torch.Tensor]) -> None:
    if reference.head != head_fingerprint(model):
        raise LeanLMError("the reference was computed with a model whose output head differs from this one")
    if reference.kind != kind or reference.protocol != record:
        raise LeanLMError(f"the reference was computed for another protocol ({reference.kind}: {reference.protocol}), "
                          f"not this one ({kind}: {record})")
    if len(reference.windows) != len(windows) or any(not torch.equal(a, b) for a, b in zip(reference.windows, windows)):
        raise LeanLMError("the reference was computed on other token ids (another tokenizer or text?)")


def evaluate_windows(model, policy: PolicyArg, windows: list[torch.Tensor], run_window, kind: str, record: dict,
              sized_for: int, reference, keep_hidden: bool = False) -> tuple[KVQualityResult, list[torch.Tensor]]:
    """Run ``run_window(model, policy, ids, bar)`` on every window, scoring it (and against a reference)."""
    if isinstance(reference, UncompressedReference):
        _check_reference(model, reference, kind, record, windows)
    elif reference not in (None, False, True):
        raise LeanLMError(f"reference must be None, True or an UncompressedReference, got {type(reference).__name__}")
    resolved = resolve_policy(policy, sized_for)
    on_the_fly = reference is True
    start = time.perf_counter()
    total, ref_total = Scores(), Scores()
    per_window, nbytes, totals, ref_nbytes, peaks, kept = [], [], [], [], [], []
    passes = 2 if on_the_fly else 1
    bar = tqdm(total=passes * sum(len(w) for w in windows), desc=f"{kind} ({resolved.name if resolved else 'none'})",
               unit="tok", leave=False)
    with torch.inference_mode(), bar:
        for i, ids in enumerate(windows):
            ref_hidden = None
            if on_the_fly:
                ref = run_window(model, None, ids, bar)
                ref_hidden, ref_nbytes = ref.hidden, ref_nbytes + [ref.nbytes]
                ref_total.add(score_hidden(model, ref.hidden, ref.targets))
            elif reference is not None and reference is not False:
                ref_hidden = reference.hidden[i]
            run = run_window(model, resolved, ids, bar)
            scores = score_hidden(model, run.hidden, run.targets, ref_hidden)
            total.add(scores)
            per_window.append(scores.nll / scores.count)
            nbytes.append(run.nbytes)
            totals.append(run.total)
            peaks.append(run.peak)
            if keep_hidden:
                kept.append(run.hidden)
    with_ref = reference is not None and reference is not False
    tokens = record["context"]  # bytes are per context token in both protocols
    if on_the_fly:
        ref_ppl, ref_bytes = math.exp(ref_total.nll / ref_total.count), sum(ref_nbytes) / len(ref_nbytes) / tokens
    elif with_ref:
        ref_ppl, ref_bytes = reference.result.perplexity, reference.result.bytes_per_token
    else:
        ref_ppl = ref_bytes = None
    result = KVQualityResult(
        perplexity=math.exp(total.nll / total.count),
        mean_nll=total.nll / total.count,
        tokens_scored=total.count,
        kl=total.kl / total.count if with_ref else None,
        top1_agreement=total.agree / total.count if with_ref else None,
        reference_perplexity=ref_ppl,
        bytes_per_token=sum(nbytes) / len(nbytes) / tokens,
        total_bytes_per_token=sum(totals) / len(totals) / tokens,
        reference_bytes_per_token=ref_bytes,
        peak_bytes=max(peaks),
        window_nll=per_window,
        policy=describe_policy(resolved),
        protocol=record,
        seconds=time.perf_counter() - start,
    )
    return result, kept
