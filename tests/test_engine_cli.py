"""`leanlm generate` through the engine: greedy output equals the engine's, speculative with --draft gives
the same text, and bad weight formats / draft settings exit 2 with one line."""

from __future__ import annotations

import torch

from leanlm import cli
from leanlm.engine import generate
from leanlm.engine.weights import quantizer
from leanlm.models import load_model, load_tokenizer


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


def test_generate_prints_the_engine_greedy_output_and_speculative_gives_the_same(capsys, tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), "bfloat16"), load_tokenizer(str(tiny_model_dir))
    ids = torch.tensor([tokenizer("Hello world")["input_ids"]])
    tokens = generate(model, ids, 6)[0].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    expected = "Hello world" + tokenizer.decode(tokens, skip_special_tokens=True)
    code, printed, _ = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "Hello world")
    assert code == 0 and printed.rstrip("\n") == expected
    code, printed, _ = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--max-new-tokens", "6",
                               "--draft", str(tiny_model_dir), "--draft-tokens", "3", "Hello world")
    assert code == 0 and printed.rstrip("\n") == expected
    code, printed, _ = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--max-new-tokens", "6",
                               "--draft", "ngram", "--draft-tokens", "3", "Hello world")
    assert code == 0 and printed.rstrip("\n") == expected


def test_bad_weight_formats_and_draft_settings_exit_2_with_one_line(capsys, tiny_model_dir):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--weights", "int9", "hi")
    assert_one_line_error(code, err, "unsupported weight format 'int9'")
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--draft", str(tiny_model_dir),
                           "--draft-tokens", "0", "hi")
    assert_one_line_error(code, err, "--draft-tokens >= 1")
    if quantizer() is None:
        code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--weights", "int8", "hi")
        assert_one_line_error(code, err, "needs leanlm.transforms.quantize")
