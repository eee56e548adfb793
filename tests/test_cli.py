"""The command line: one-sentence errors with exit 2, results that are never half-written or overwritten."""

import json
import subprocess
import sys

import pytest

from leanlm import cli
from leanlm.data import wikitext as wikitext_module


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_unknown_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--model", "no-such-model", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown model 'no-such-model'")
    assert not (tmp_path / "r").exists()


def test_unreadable_model_file(capsys, tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x00\x01")
    code, _, err = run_cli(capsys, "eval", "--model", str(bad), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "not a .gguf")


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["eval", "--max-tokens", "0"], "--max-tokens"),
        (["eval", "--max-tokens", "lots"], "--max-tokens"),
        (["eval", "--window", "128", "--stride", "512"], "stride"),
        (["eval", "--dtype", "int3"], "--dtype"),
        (["eval", "--protocol", "random"], "--protocol"),
        (["analyze", "--scorers", "kl,vibes"], "unknown scorer 'vibes'"),
        (["kv-budget", "--heads", "9", "--kv-heads", "2"], "multiple of KV heads"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_option_values(capsys, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "r")] if argv[0] != "kv-budget" and argv[0] != "frobnicate" else []))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


def test_missing_data_is_one_sentence(capsys, tmp_path, monkeypatch, tiny_model_dir):
    wikitext_module.wikitext_lines.cache_clear()
    monkeypatch.setattr(wikitext_module, "_candidate_dirs", lambda: [tmp_path])
    monkeypatch.setattr(wikitext_module, "_lines_from_hub", lambda split: None)
    try:
        code, _, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"))
    finally:
        wikitext_module.wikitext_lines.cache_clear()
    assert_one_line_error(code, err, "WikiText-2 'test' not found")
    assert not (tmp_path / "r").exists()


def test_existing_results_are_never_overwritten(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text("{}")
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--out", str(out))
    assert_one_line_error(code, err, "already exists")
    assert (out / "results.json").read_text() == "{}"


def test_interrupted_eval_leaves_nothing(capsys, tmp_path, monkeypatch, tiny_model_dir):
    import leanlm.evaluate.harness as harness

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "plot_window_nll", interrupted)  # dies while writing the report
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                           "--max-tokens", "300", "--window", "128", "--no-speed")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder


@pytest.mark.real_model
def test_eval_writes_results_and_report(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--out", str(out), "--max-tokens", "600",
                              "--window", "256", "--stride", "128", "--speed-repeats", "1", "--prefill-lengths", "32,64",
                              "--decode-batches", "1,4", "--decode-tokens", "4")
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    for key in ("perplexity", "protocol", "kv_bytes_per_token", "weight_bytes", "params", "prefill_tokens_per_s",
                "decode_tokens_per_s", "decode_latency_ms_p50", "decode_latency_ms_p95", "peak_rss_mb", "versions", "git"):
        assert key in results, key
    assert results["protocol"]["tokens_scored"] == 599 and results["protocol"]["split"] == "test"
    assert results["kv_bytes_per_token"] == results["kv_bytes_per_token_analytic"] == 2 * 2 * 2 * 16 * 2  # bf16
    assert set(results["decode_tokens_per_s"]) == {"1", "4"}
    report = (out / "report.md").read_text()
    assert "perplexity" in report and "plots/perplexity_windows.png" in report
    for plot in ("perplexity_windows.png", "decode_latency.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG, not an empty file


@pytest.mark.real_model
def test_kv_budget_of_the_real_model(capsys):
    code, stdout, _ = run_cli(capsys, "kv-budget", "--model", "smollm2-135m", "--json", "--seq-len", "1000")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(stdout)}
    model_row = next(row for name, row in rows.items() if "model" in name)
    assert model_row["bytes_per_token"] == 2 * 30 * 3 * 64 * 2  # 23,040 bytes in bf16
    assert model_row["bytes_per_sequence"] == 23_040 * 1000


def test_console_script_help_and_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "leanlm.cli", "eval", "--model", "nope", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    helped = subprocess.run([sys.executable, "-m", "leanlm.cli", "eval", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--max-tokens" in helped.stdout and "nonoverlap" in helped.stdout


@pytest.mark.real_model  # bundled tokenizer + WikiText-2 validation, tiny model
def test_analyze_prune_distill_export_commands(capsys, tmp_path, tiny_model_dir):
    import torch

    from leanlm.models import ModelSpec, load_model

    analyzed = tmp_path / "analyze"
    assert run_cli(capsys, "analyze", "--model", str(tiny_model_dir), "--out", str(analyzed), "--dtype", "float32",
                   "--scorers", "magnitude,taylor", "--calib-samples", "2", "--calib-len", "16")[0] == 0
    scores = json.loads((analyzed / "scores_taylor.json").read_text())
    assert [len(row) for row in scores["per_head"]] == [4, 4]
    assert (analyzed / "plots" / "heads_taylor.png").stat().st_size > 0

    pruned = tmp_path / "pruned"
    assert run_cli(capsys, "prune", "--model", str(tiny_model_dir), "--out", str(pruned), "--scorer", "magnitude",
                   "--fraction", "0.5", "--layout", "uniform", "--granularity", "kv_group",
                   "--calib-samples", "2", "--calib-len", "16")[0] == 0
    model = load_model(str(pruned / "model"))
    assert ModelSpec.from_model(model).kv_heads_per_layer == (1, 1)  # one of two KV groups left per layer

    recovered = tmp_path / "recovered"
    assert run_cli(capsys, "distill", "--student", str(pruned / "model"), "--teacher", str(tiny_model_dir),
                   "--out", str(recovered), "--steps", "2")[0] == 0
    merged = load_model(str(recovered / "model"))
    assert json.loads((recovered / "distill.json").read_text())["steps_done"] == 2
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        assert not torch.equal(merged(ids).logits, model(ids).logits)  # training changed the weights

    exported = tmp_path / "exported"
    assert run_cli(capsys, "export", "--model", str(recovered / "model"), "--out", str(exported))[0] == 0
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(exported)  # uniform layout: plain transformers loads it
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, merged(ids).logits)
    assert "README.md" in {p.name for p in exported.iterdir()}


@pytest.mark.parametrize("argv,fragment", [
    (["prune", "--fraction", "1.0"], "--fraction must be in [0, 1)"),
    (["prune", "--scorer", "vibes"], "'prune_heads.scorer' must be one of kl, magnitude, taylor, got 'vibes'"),
    (["prune", "--what", "experts"], "--what must be one of heads, layers, mlp"),
    (["prune", "--what", "layers", "--fraction", "0.2"], "--fraction does not apply to --what layers"),
    (["prune", "--what", "mlp", "--granularity", "query"], "--granularity does not apply to --what mlp"),
])
def test_prune_bad_input(capsys, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, fragment)


def test_eval_with_kv_cache_writes_policy_and_full_cache_side_by_side(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "kv"
    code, printed, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--dtype", "float32", "--out", str(out),
                               "--kv-cache", "sink_window", "--kv-budget", "0.25", "--kv-context", "128",
                               "--kv-chunk", "16", "--max-tokens", "256")
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert results["kv_cache"]["policy"] == "sink_window"
    assert results["kv_cache"]["sink"] + results["kv_cache"]["window"] == 32  # 25% of 128 tokens
    # 32 of 128 tokens held at the end of each window, measured from the cache's tensors
    assert results["bytes_ratio"] == pytest.approx(0.25)
    assert results["kl"] > 0  # eviction changes the predictions
    assert results["ppl_ratio"] == pytest.approx(results["perplexity"] / results["uncompressed"]["perplexity"])
    assert results["ppl_ratio"] != 1.0
    assert (out / "report.md").exists()


def test_generate_streams_through_a_policy_and_rejects_bad_policies(capsys, tiny_model_dir):
    code, printed, _ = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--max-new-tokens", "5",
                               "--kv-cache", "heavy_hitter", "--kv-budget", "0.5", "--kv-context", "8", "Hello world")
    assert code == 0 and printed.startswith("Hello world")
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--kv-cache", "magic", "hi")
    assert code == 2 and "unknown KV-cache policy" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--kv-cache", "sink_window",
                           "--kv-budget", "2", "hi")
    assert code == 2 and "budget" in err


@pytest.mark.real_model  # bundled tokenizer + WikiText-2 validation (calibration), tiny model
@pytest.mark.parametrize("what,options,check", [
    ("layers", ["--num-layers", "1"], lambda spec: spec.num_layers == 1),
    ("mlp", ["--fraction", "0.25", "--layout", "global"], lambda spec: sum(spec.intermediate_per_layer) == 192),
])
def test_prune_layers_and_mlp_from_the_cli(capsys, tmp_path, tiny_model_dir, what, options, check):
    from leanlm.models import ModelSpec, load_model

    out = tmp_path / what
    code, printed, _ = run_cli(capsys, "prune", "--what", what, *options, "--model", str(tiny_model_dir), "--out",
                               str(out), "--device", "cpu", "--calib-samples", "2", "--calib-len", "16")
    assert code == 0 and "parameters" in printed
    assert check(ModelSpec.from_model(load_model(str(out / "model"))))  # 2 x 128 channels, a quarter removed
    assert json.loads((out / "prune.json").read_text())["transform"]["settings"]["name"] == f"prune_{what}"
