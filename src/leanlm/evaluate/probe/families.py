"""Prompt families of the behaviour probe: procedurally generated, deterministic for a seed, answers by code.

Each family builds a prompt from a ``random.Random`` and solves it with a small pure function (so the
answer is computed, never typed in, and the solvers are tested on hand-checked cases). A prompt ends
where the answer should begin ("... Answer:"), so a base model and an instruct model can both answer.

    prompts = make_prompts(["relation_chain", "arithmetic"], per_family=8, seed=0)
    check_answer(prompts[0], "Bob is the shortest.")   # True / False

Held-out text continuations (no answer, only agreement and KL) are built by ``continuation_prompts``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from leanlm.errors import LeanLMError

NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Kate", "Liam")
OBJECTS = ("apples", "books", "coins", "pencils", "cards", "marbles", "stamps", "shells")
WORDS = ("apple", "river", "stone", "lamp", "moon", "chair", "cloud", "green", "paper", "horse", "window", "sugar",
         "glass", "tiger", "forest", "silver", "candle", "bridge", "garden", "winter")
ANIMALS = ("cat", "dog", "bird", "fish", "fox", "cow")
RELATIONS = {  # relation: (word for "more", the extreme asked for at the top, at the bottom)
    "taller": ("taller than", "tallest", "shortest"),
    "older": ("older than", "oldest", "youngest"),
    "faster": ("faster than", "fastest", "slowest"),
}


@dataclass(frozen=True)
class ProbePrompt:
    """One probe prompt; ``answer`` is None for free continuations (agreement and KL only)."""

    family: str
    text: str
    answer: str | None = None
    kind: str = "none"  # how to read the answer: name | int | int_list | words | none
    choices: tuple[str, ...] = field(default=())  # kind "name": the names the answer is picked among


# ------------------------------------------------------------------------------ solvers (pure)


def chain_extreme(facts: list[tuple[str, str]], top: bool) -> str:
    """``facts``: (x, y) meaning "x is more than y", forming one chain. The top (never below) or bottom one."""
    above = {x for x, _ in facts}
    below = {y for _, y in facts}
    found = (above - below) if top else (below - above)
    if len(found) != 1:
        raise ValueError(f"facts {facts} do not form one chain")
    return found.pop()


def apply_ops(start: int, ops: list[tuple[str, int]]) -> int:
    """Run ("add", n) / ("sub", n) operations from ``start``."""
    value = start
    for op, amount in ops:
        value = value + amount if op == "add" else value - amount
    return value


def count_item(items: list[str], item: str) -> int:
    return sum(1 for x in items if x == item)


# ------------------------------------------------------------------------------ families


def _count(amount: int, plural: str) -> str:
    return f"{amount} {plural[:-1] if amount == 1 else plural}"  # every OBJECTS word is a plain -s plural


def relation_chain(rng: random.Random) -> ProbePrompt:
    """'A is taller than B. C is taller than A. ... Who is the shortest?': combine 2-3 facts."""
    relation, (phrase, top_word, bottom_word) = rng.choice(sorted(RELATIONS.items()))
    people = rng.sample(NAMES, rng.choice((3, 4)))  # ordered from top to bottom
    facts = [(people[i], people[i + 1]) for i in range(len(people) - 1)]
    rng.shuffle(facts)  # stated out of order: the answer needs the whole chain
    top = rng.random() < 0.5
    answer = chain_extreme(facts, top)
    stated = " ".join(f"{x} is {phrase} {y}." for x, y in facts)
    text = f"{stated} Question: Who is the {top_word if top else bottom_word}? Answer:"
    return ProbePrompt("relation_chain", text, answer, "name", tuple(sorted(people)))


def arithmetic(rng: random.Random) -> ProbePrompt:
    """A small word problem of 2-3 steps, never going below zero."""
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    value = rng.randint(2, 9)
    start, ops, sentences = value, [], []
    for _ in range(rng.choice((2, 3))):
        if value > 1 and rng.random() < 0.5:
            amount = rng.randint(1, value - 1)
            ops.append(("sub", amount))
            sentences.append(f"{name} gives {_count(amount, thing)} to a friend.")
        else:
            amount = rng.randint(1, 9)
            ops.append(("add", amount))
            sentences.append(f"{name} gets {_count(amount, thing)} more.")
        value = apply_ops(start, ops)
    text = f"{name} has {start} {thing}. {' '.join(sentences)} How many {thing} does {name} have now? Answer:"
    return ProbePrompt("arithmetic", text, str(apply_ops(start, ops)), "int")


def list_order(rng: random.Random) -> ProbePrompt:
    """Sort 4-5 distinct numbers from smallest to largest."""
    numbers = rng.sample(range(1, 50), rng.choice((4, 5)))
    text = f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}. Answer:"
    return ProbePrompt("list_order", text, ", ".join(map(str, sorted(numbers))), "int_list")


def copying(rng: random.Random) -> ProbePrompt:
    """Repeat 4-6 unrelated words exactly."""
    words = rng.sample(WORDS, rng.choice((4, 5, 6)))
    text = f"Repeat these words exactly: {' '.join(words)}. Answer:"
    return ProbePrompt("copying", text, " ".join(words), "words")


def counting(rng: random.Random) -> ProbePrompt:
    """How many times one word appears in a list of 6-9."""
    kinds = rng.sample(ANIMALS, 3)
    items = [rng.choice(kinds) for _ in range(rng.randint(6, 9))]
    target = rng.choice(kinds)
    text = f"Here is a list: {', '.join(items)}. How many times does the word {target} appear in the list? Answer:"
    return ProbePrompt("counting", text, str(count_item(items, target)), "int")


FAMILIES: dict[str, Callable[[random.Random], ProbePrompt]] = {
    "relation_chain": relation_chain,
    "arithmetic": arithmetic,
    "list_order": list_order,
    "copying": copying,
    "counting": counting,
}


def with_shots(prompt: ProbePrompt, shots: list[ProbePrompt]) -> ProbePrompt:
    """The prompt preceded by solved examples of its family ("... Answer: Bob." blocks)."""
    solved = "".join(f"{shot.text} {shot.answer}.\n\n" for shot in shots)
    return ProbePrompt(prompt.family, solved + prompt.text, prompt.answer, prompt.kind, prompt.choices)


def make_prompts(families: list[str] | tuple[str, ...], per_family: int, seed: int, shots: int = 2) -> list[ProbePrompt]:
    """``per_family`` prompts of each family, the same for the same seed (each family its own stream), each
    after ``shots`` solved examples of the same family (a 135M model rarely answers in format without them)."""
    unknown = [name for name in families if name not in FAMILIES]
    if unknown:
        raise LeanLMError(f"unknown probe family '{unknown[0]}'; choose from {', '.join(FAMILIES)}")
    if per_family < 1 or shots < 0:
        raise LeanLMError(f"prompts per family must be positive and shots not negative, got {per_family} and {shots}")
    prompts = []
    for name in families:
        rng = random.Random(f"leanlm-probe/{name}/{seed}")  # str seeds are hashed with SHA-512: stable everywhere
        for _ in range(per_family):
            examples = [FAMILIES[name](rng) for _ in range(shots)]
            prompts.append(with_shots(FAMILIES[name](rng), examples))
    return prompts


def continuation_prompts(name: str, text: str, tokenizer, count: int, prompt_tokens: int, seed: int) -> list[ProbePrompt]:
    """``count`` passages of ``text`` (paragraphs of at least 2x ``prompt_tokens`` tokens), cut to their first
    ``prompt_tokens`` tokens; the model continues them freely. Family name ``continue:<name>``."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n|\n(?= =)", text) if len(p.strip()) > 8 * prompt_tokens]
    if not paragraphs:
        paragraphs = [p.strip() for p in text.splitlines() if len(p.strip()) > 8 * prompt_tokens]
    if not paragraphs:
        raise LeanLMError(f"the text '{name}' has no paragraph long enough for a {prompt_tokens}-token prompt")
    rng = random.Random(f"leanlm-probe/continue:{name}/{seed}")
    chosen = rng.sample(paragraphs, min(count, len(paragraphs)))
    prompts = []
    for paragraph in chosen:
        ids = tokenizer(paragraph, add_special_tokens=False)["input_ids"][:prompt_tokens]
        prompts.append(ProbePrompt(f"continue:{name}", tokenizer.decode(ids)))
    return prompts


# ------------------------------------------------------------------------------ answer checks


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def read_answer(prompt: ProbePrompt, output: str) -> str | None:
    """What the model answered, read from its output text the way the family's ``kind`` says."""
    if prompt.kind == "name":
        lowered = {c.lower(): c for c in prompt.choices}
        return next((lowered[w.lower()] for w in _words(output) if w.lower() in lowered), None)
    if prompt.kind == "int":
        numbers = _ints(output)
        return str(numbers[0]) if numbers else None
    if prompt.kind == "int_list":
        wanted = len(prompt.answer.split(","))
        numbers = _ints(output)[:wanted]
        return ", ".join(map(str, numbers)) if numbers else None
    if prompt.kind == "words":
        wanted = len(prompt.answer.split())
        return " ".join(w.lower() for w in _words(output)[:wanted]) or None
    return None


def check_answer(prompt: ProbePrompt, output: str) -> bool | None:
    """True / False for prompts with an answer (the first name / number / list in the output), None otherwise."""
    if prompt.answer is None:
        return None
    return read_answer(prompt, output) == prompt.answer
