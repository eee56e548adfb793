"""3. Passkey retrieval: a random key hidden at a depth of WikiText-2 filler; greedy exact match."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanlm.data import split_sentences
from leanlm.data.wikitext import wikitext_text
from leanlm.errors import LeanLMError
from leanlm.evaluate.kv.common import (PolicyArg, dtype_name, encode_text, cache_held_tokens, cache_nbytes, cache_total_nbytes,
                                      describe_policy, open_cache, resolve_policy)
from leanlm.engine.decode import forward, prefill, start_state
from leanlm.engine.sampling import Sampler

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyProtocol:
    """Prompts of ``lengths`` tokens of WikiText-2 filler (test by default) with a 5-digit key at each of ``depths``."""

    lengths: tuple[int, ...] = field(default=(2048, 4096, 8192), metadata={"help": "prompt lengths in tokens"})
    depths: tuple[float, ...] = field(default=(0.1, 0.5, 0.9), metadata={"help": "where the key sits in the filler (0..1)"})
    seed: int = field(default=0, metadata={"help": "seeds the random keys"})
    prefill_chunk: int = field(default=512, metadata={"help": "prompt tokens per prefill forward (bounds attention memory)"})
    filler_split: str = field(default="test", metadata={"help": "WikiText-2 split of the filler (a search scores on validation)"})

    def validate(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise LeanLMError(f"passkey lengths must be positive token counts, got {self.lengths}")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise LeanLMError(f"passkey depths must lie in [0, 1], got {self.depths}")
        if self.prefill_chunk < 1:
            raise LeanLMError(f"passkey prefill chunk must be positive, got {self.prefill_chunk}")


@dataclass
class PasskeyItem:
    ids: list[int]  # the whole prompt, ending with the question
    answer_ids: list[int]  # the tokens that continue the prompt with the key
    length: int  # requested prompt length (len(ids) equals it)
    depth: float
    passkey: str
    key_start: int  # index in `ids` where the key sentence begins


def _filler_sentences(tokenizer, tokens_needed: int, split: str = "test") -> list[list[int]]:
    """Token ids of WikiText-2 ``split`` sentences from the start of the file, at least ``tokens_needed`` in all."""
    sentences = split_sentences(wikitext_text(split, "raw"))
    pieces, total, batch = [], 0, 256
    for start in range(0, len(sentences), batch):
        for ids in tokenizer(sentences[start : start + batch], add_special_tokens=False)["input_ids"]:
            pieces.append(list(ids))
            total += len(ids)
        if total >= tokens_needed:
            return pieces
    raise LeanLMError(f"WikiText-2 {split} has {total} tokens, fewer than the {tokens_needed} filler tokens asked for")


def _answer_ids(tokenizer, key: str) -> list[int]:
    """The key's tokens as they continue the question (tokenized together, so merges match)."""
    question = encode_text(tokenizer, PASSKEY_QUESTION)
    both = encode_text(tokenizer, PASSKEY_QUESTION + " " + key)
    if both[: len(question)] == question and len(both) > len(question):
        return both[len(question) :]
    return encode_text(tokenizer, " " + key)


def passkey_prompts(tokenizer, protocol: PasskeyProtocol | None = None) -> list[PasskeyItem]:
    """One prompt per (length, depth): intro, filler with the key sentence, question; exactly ``length`` tokens.

    The filler is the start of WikiText-2 ``filler_split`` (the same contiguous text for every item, cut at the
    length). The key sentence goes in at the sentence boundary nearest ``depth`` × the filler. Keys are
    random 5-digit numbers drawn in item order from ``random.Random(seed)``.
    """
    protocol = protocol or PasskeyProtocol()
    protocol.validate()
    rng = random.Random(protocol.seed)
    intro, question = encode_text(tokenizer, PASSKEY_INTRO), encode_text(tokenizer, PASSKEY_QUESTION)
    sentences = _filler_sentences(tokenizer, max(protocol.lengths), protocol.filler_split)
    filler = [t for s in sentences for t in s]
    ends = [0]  # sentence boundaries, as token offsets into `filler`
    for s in sentences:
        ends.append(ends[-1] + len(s))
    items = []
    for length in protocol.lengths:
        for depth in protocol.depths:
            key = str(rng.randint(10000, 99999))
            key_ids = encode_text(tokenizer, PASSKEY_SENTENCE.format(key=key))
            budget = length - len(intro) - len(key_ids) - len(question)  # filler tokens
            if budget < 1:
                raise LeanLMError(f"a passkey prompt of {length} tokens has no room for filler: use at least "
                                  f"{length - budget + 1} tokens")
            boundaries = [e for e in ends if e <= budget] + [budget]
            insert = min(boundaries, key=lambda e: abs(e - depth * budget))
            ids = intro + filler[:insert] + key_ids + filler[insert:budget] + question
            items.append(PasskeyItem(ids, _answer_ids(tokenizer, key), length, depth, key, len(intro) + insert))
    return items


@dataclass
class PasskeyResult:
    accuracy: dict[str, float]  # key: prompt length; exact match of the greedy answer
    answer_loglik: dict[str, float]  # key: prompt length; mean total log-likelihood of the answer tokens (nats)
    items: list[dict]  # per item: length, depth, passkey, correct, loglik, predicted, cache bytes
    policy: dict[str, dict]  # key: prompt length; the policy attached for that length
    protocol: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_eval(model, tokenizer, policy: PolicyArg, items: list[PasskeyItem],
                 protocol: PasskeyProtocol | None = None) -> PasskeyResult:
    """Greedy exact match and answer log-likelihood of each passkey prompt under ``policy``.

    Each prompt is prefilled through the policy in chunks of ``protocol.prefill_chunk`` tokens, so an
    evicting policy already evicts during the prefill (as a real long prompt would need). A factory
    policy is called with each prompt's length.
    """
    protocol = protocol or PasskeyProtocol()
    protocol.validate()
    start = time.perf_counter()
    details, policies = [], {}
    greedy, device = Sampler(), next(model.parameters()).device  # the engine's sampler, temperature 0
    bar = tqdm(total=sum(len(it.ids) + len(it.answer_ids) for it in items), desc="passkey", unit="tok", leave=False)
    with torch.inference_mode(), bar:
        for item in items:
            resolved = resolve_policy(policy, item.length)
            policies[str(item.length)] = describe_policy(resolved)
            with open_cache(model, resolved) as cache:
                ids = torch.tensor([item.ids], device=device)  # (1, length)
                state = start_state(model, ids, None, cache, ids.shape[1] + len(item.answer_ids))
                logits = prefill(model, ids, state, protocol.prefill_chunk)  # (1, vocab): predicts answer token 0
                bar.update(ids.shape[1])
                nbytes, held, total = cache_nbytes(cache), cache_held_tokens(cache), cache_total_nbytes(cache)
                # One pass gives both numbers. The answer is teacher-forced one token per forward, exactly
                # as greedy decoding would feed it: while every argmax so far equals the answer, greedy's
                # inputs *are* the answer tokens, so its next argmax is the one computed here; at the first
                # mismatch both verdicts are "wrong". Hence greedy exact match == all argmaxes equal the
                # answer. One token per forward (not the answer in one forward) keeps the cache dynamics of
                # real decoding: an evicting policy evicts after every token, a quantizing one flushes its
                # residual when it fills.
                loglik, predicted = 0.0, []
                for i, target in enumerate(item.answer_ids):
                    loglik += F.log_softmax(logits[0].float(), dim=-1)[target].item()
                    predicted.append(int(greedy.sample(logits)[0]))
                    if i + 1 < len(item.answer_ids):
                        logits = forward(model, torch.tensor([[target]], device=device), state)[:, -1]  # (1, vocab)
                    bar.update(1)
            details.append({
                "length": item.length, "depth": item.depth, "passkey": item.passkey,
                "correct": predicted == item.answer_ids, "loglik": loglik,
                # argmax at each teacher-forced step: the greedy output up to and including its first error
                "predicted": tokenizer.decode(predicted), "cache_bytes": nbytes, "total_bytes": total,
                "held_tokens": held,
            })
    lengths = sorted({d["length"] for d in details})
    accuracy = {str(n): _mean([d["correct"] for d in details if d["length"] == n]) for n in lengths}
    loglik = {str(n): _mean([d["loglik"] for d in details if d["length"] == n]) for n in lengths}
    record = {"name": "passkey", **asdict(protocol), "items": len(items), "item_lengths": lengths,
              "item_depths": sorted({d["depth"] for d in details}), "dtype": dtype_name(model), "bos": False,
              "filler": "WikiText-2 test from its start", "decoding": "greedy (exact match via stepwise teacher forcing)"}
    return PasskeyResult(accuracy, loglik, details, policies, record, time.perf_counter() - start)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def normalise(result: PasskeyResult | dict, baseline: PasskeyResult | dict) -> dict[str, dict]:
    """A passkey result relative to a baseline (e.g. the uncompressed cache), laid out like the result.

    ``{"accuracy": {length: accuracy / baseline accuracy, None where the baseline scores 0},
    "answer_loglik": {length: answer log-likelihood - the baseline's (nats; < 0 is worse)}}``.
    Takes results or their ``to_dict()`` (e.g. read back from JSON).
    """
    res = result.to_dict() if isinstance(result, PasskeyResult) else result
    base = baseline.to_dict() if isinstance(baseline, PasskeyResult) else baseline
    accuracy, loglik = {}, {}
    for length, acc in res["accuracy"].items():
        if length not in base["accuracy"]:
            raise LeanLMError(f"the baseline has no passkey result for length {length}")
        base_acc = base["accuracy"][length]
        accuracy[length] = acc / base_acc if base_acc > 0 else None
        loglik[length] = res["answer_loglik"][length] - base["answer_loglik"][length]
    return {"accuracy": accuracy, "answer_loglik": loglik}
