"""Behaviour probe: deterministic prompts, answers computed by code (hand-checked), self-agreement 1 / KL 0,
a perturbed student departs, and the CLI writes its JSON, report and plot."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from leanlm.cli import main
from leanlm.evaluate.probe import FAMILIES, ProbeConfig, check_answer, continuation_prompts, make_prompts, probe
from leanlm.evaluate.probe.families import ProbePrompt, apply_ops, chain_extreme, count_item, read_answer
from leanlm.evaluate.probe.measure import compare, encode
from leanlm.models import load_model

# ------------------------------------------------------------------------------ prompts and answers


def test_prompts_are_deterministic_for_a_seed():
    first = make_prompts(list(FAMILIES), 4, seed=3)
    assert first == make_prompts(list(FAMILIES), 4, seed=3)
    assert first != make_prompts(list(FAMILIES), 4, seed=4)
    assert [p.family for p in first] == [f for f in FAMILIES for _ in range(4)]
    assert len({p.text for p in first}) == len(first)  # no repeats


def test_solvers_on_hand_checked_cases():
    facts = [("Cid", "Ann"), ("Ann", "Bob")]  # Cid > Ann > Bob, stated out of order
    assert chain_extreme(list(reversed(facts)), top=True) == "Cid"
    assert chain_extreme(facts, top=False) == "Bob"
    with pytest.raises(ValueError):
        chain_extreme([("A", "B"), ("C", "D")], top=True)  # two chains: no single answer
    assert apply_ops(4, [("sub", 3), ("add", 2), ("sub", 1)]) == 2
    assert apply_ops(5, [("add", 9), ("add", 1)]) == 15
    assert count_item(["dog", "cow", "dog", "fox"], "dog") == 2


def _last_question(text: str) -> str:
    return text.split("\n\n")[-1]  # the shots come first, the prompt itself last


def test_relation_answers_match_an_independent_reading_of_the_text():
    for p in make_prompts(["relation_chain"], 20, seed=0):
        question = _last_question(p.text)
        pairs = re.findall(r"(\w+) is \w+ than (\w+)\.", question)
        order = {}  # rank by walking the chain from its top
        top = ({a for a, _ in pairs} - {b for _, b in pairs}).pop()
        chain, nxt = [top], dict(pairs)
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        order = chain
        asks_top = re.search(r"Who is the (tallest|oldest|fastest)\?", question) is not None
        assert p.answer == (order[0] if asks_top else order[-1]), question


def test_arithmetic_and_counting_answers_match_an_independent_reading():
    for p in make_prompts(["arithmetic"], 20, seed=1):
        question = _last_question(p.text)
        value = int(re.search(r"has (\d+) ", question).group(1))
        for verb, amount in re.findall(r"(gives|gets) (\d+) ", question):
            value += int(amount) if verb == "gets" else -int(amount)
        assert value >= 0 and p.answer == str(value), question
    for p in make_prompts(["counting"], 20, seed=1):
        question = _last_question(p.text)
        items = re.search(r"list: ([a-z, ]+)\.", question).group(1).split(", ")
        target = re.search(r"does the word (\w+) appear", question).group(1)
        assert p.answer == str(items.count(target)), question
    for p in make_prompts(["list_order"], 10, seed=1):
        numbers = [int(x) for x in re.search(r"largest: ([\d, ]+)\.", _last_question(p.text)).group(1).split(", ")]
        assert p.answer == ", ".join(map(str, sorted(numbers)))


def test_shots_are_solved_examples_of_the_same_family():
    p = make_prompts(["copying"], 1, seed=0, shots=2)[0]
    blocks = p.text.split("\n\n")
    assert len(blocks) == 3 and blocks[-1].startswith("Repeat these words exactly:")
    for shot in blocks[:2]:
        words = re.search(r"exactly: ([a-z ]+)\. Answer: ([a-z ]+)\.$", shot)
        assert words.group(1) == words.group(2)


def test_check_answer_on_hand_checked_outputs():
    name = ProbePrompt("relation_chain", "...", "Bob", "name", ("Ann", "Bob", "Cid"))
    assert check_answer(name, " Bob.\n\nAnn is taller") is True
    assert check_answer(name, " The answer is bob") is True  # case-insensitive, first name mentioned
    assert check_answer(name, " Cid, not Bob") is False
    assert check_answer(name, " nobody") is False
    number = ProbePrompt("arithmetic", "...", "12", "int")
    assert check_answer(number, " 12 apples") is True and check_answer(number, " 2, 12") is False
    ordered = ProbePrompt("list_order", "...", "1, 5, 10, 29", "int_list")
    assert check_answer(ordered, " 1, 5, 10, 29. Next") is True
    assert check_answer(ordered, " 1, 5, 29, 10.") is False
    assert read_answer(ordered, " 1, 5") == "1, 5"
    words = ProbePrompt("copying", "...", "lamp stone moon", "words")
    assert check_answer(words, " Lamp stone moon.\n") is True
    assert check_answer(words, " lamp moon stone") is False
    assert check_answer(ProbePrompt("continue:x", "text"), "anything") is None


def test_continuation_prompts_are_deterministic_and_cut(real_tokenizer):
    text = "\n\n".join(f"Paragraph {i} " + "word " * 200 for i in range(10))
    a = continuation_prompts("t", text, real_tokenizer, 3, 16, seed=0)
    assert a == continuation_prompts("t", text, real_tokenizer, 3, 16, seed=0)
    assert len(a) == 3 and all(p.family == "continue:t" and p.answer is None for p in a)
    assert all(len(real_tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 17 for p in a)


# ------------------------------------------------------------------------------ measurement


def test_compare_counts_the_first_divergence():
    teacher = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    student = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4]])
    got = compare(teacher, student)
    assert got["first_divergence"].tolist() == [2, 4]
    assert got["match"].float().mean().item() == pytest.approx(7 / 8)
    assert got["prefix"][0].tolist() == [True, True, False, False]  # the matching 4th token does not count


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model_dir):
    return load_model(str(tiny_model_dir), "float32")


def _prompts(real_tokenizer):
    text = "\n\n".join(f"The river {i} runs " + "far and wide " * 60 for i in range(6))
    return make_prompts(["relation_chain", "arithmetic"], 2, 0, shots=0) + continuation_prompts(
        "river", text, real_tokenizer, 2, 12, 0)


def test_a_model_agrees_with_itself(tiny_teacher, real_tokenizer):
    config = ProbeConfig(new_tokens=8, batch_size=3)
    results = probe(tiny_teacher, {"self": copy.deepcopy(tiny_teacher)}, real_tokenizer, _prompts(real_tokenizer), config)
    me = results["students"]["self"]
    assert me["overall"]["agreement"] == 1.0 and me["overall"]["first_divergence_mean"] == 8
    assert me["overall"]["kl_mean"] < 1e-6 and me["overall"]["forced_top1"] == 1.0
    assert me["curves"]["identical_so_far"] == [1.0] * 8
    assert me["overall"]["accuracy_teacher"] == me["overall"]["accuracy_student"]
    assert set(me["families"]) == {"relation_chain", "arithmetic", "continue:river"}


def test_a_perturbed_student_departs(tiny_teacher, real_tokenizer):
    student = copy.deepcopy(tiny_teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in student.model.layers.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    config = ProbeConfig(new_tokens=8, batch_size=3)
    results = probe(tiny_teacher, {"noisy": student}, real_tokenizer, _prompts(real_tokenizer), config)
    noisy = results["students"]["noisy"]
    assert noisy["overall"]["agreement"] < 1.0
    assert noisy["overall"]["kl_mean"] > 1e-3
    assert noisy["overall"]["first_divergence_mean"] < 8
    assert len(noisy["departs_most"]) == 3 and len(noisy["prompts"]) == 6


def test_left_padded_batches_decode_like_single_prompts(tiny_teacher, real_tokenizer):
    from leanlm.evaluate.probe.measure import greedy_outputs

    ids = encode(_prompts(real_tokenizer), real_tokenizer)
    batched = greedy_outputs(tiny_teacher, ids, 6, batch_size=6)
    single = torch.cat([greedy_outputs(tiny_teacher, [row], 6, batch_size=1) for row in ids])
    assert torch.equal(batched, single)


def test_probe_cli_writes_json_report_and_plot(tiny_model_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join("A quiet town by the sea. " * 30 for _ in range(3)))
    out = tmp_path / "probe"
    code = main(["probe", "--student", f"same={tiny_model_dir}", "--teacher", str(tiny_model_dir), "--out", str(out),
                 "--families", "counting", "--per-family", "2", "--texts", str(text), "--continuations", "1",
                 "--new-tokens", "4", "--dtype", "float32", "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["students"]["same"]["overall"]["agreement"] == 1.0 and results["num_prompts"] == 3
    assert (out / "plots" / "agreement.png").stat().st_size > 0 and "counting" in (out / "report.md").read_text()
    assert main(["probe", "--student", "a=x", "a=y", "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "p2")]) == 2
