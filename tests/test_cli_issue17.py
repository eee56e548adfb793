"""The CLI as a new user meets it (issue 17), run as a real process: exit code, stderr's one line, what is on disk.

`test_bad_inputs` is the table: every case exits 2 with one line on stderr, no traceback, and leaves
neither the output nor a staging folder. Cases fail before any model is loaded (most before torch is
even imported), so each takes about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-prune25.yaml"


def cli(*argv, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`leanlm ARGV` in a fresh process (this checkout's source), offline, one thread."""
    full_env = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
                             "TQDM_DISABLE": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "leanlm.cli", *map(str, argv)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, **kwargs)


def assert_one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and fragment in lines[0], done.stderr


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model stored in bfloat16, as a bf16 release (SmolLM2's own dtype) is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


# --------------------------------------------------------------------------- the table of bad inputs

LONG_PROMPT = "word " * 4200  # > 4096 tokens, the tiny model's context
BAD_INPUTS = [
    # (argv, fragment of the one error line); {out} is the output path, {model} the tiny model, {file} a plain file
    (["eval", "--max-tokens", "0", "--out", "{out}"], "--max-tokens"),
    (["eval", "--dtype", "int3", "--out", "{out}"], "--dtype"),
    (["eval", "--kv-budget", "0.1", "--out", "{out}"], "--kv-budget only apply to a KV-cache policy"),
    (["generate", "--kv-context", "128", "hi"], "--kv-context only apply to a KV-cache policy"),
    (["eval", "--kv-cache", "sink_window", "--kv-budget", "2", "--out", "{out}"], "--kv-budget must be in (0, 1]"),
    (["prune", "--fraction", "1.0", "--out", "{out}"], "--fraction must be in [0, 1)"),
    (["prune", "--fraction", "-0.1", "--out", "{out}"], "--fraction must be in [0, 1)"),
    (["prune", "--fraction", "0.5", "--out", "/proc/leanlm-x"], "cannot write the output '/proc/leanlm-x'"),
    (["prune", "--fraction", "0.5", "--out", "{file}/x"], "is a file, not a folder"),
    (["analyze", "--out", "{file}/x/y"], "is a file, not a folder"),
    (["export", "--model", "{model}", "--out", "{file}/x"], "is a file, not a folder"),
    (["export", "--model", "{model}", "--out", "{out}", "--dtype", "int8"], "--dtype"),
    (["eval", "--model", "{model}", "--out", "{used}"], "already exists and is not empty"),
    (["distill", "--student", "{model}", "--out", "{out}", "--resume"], "nothing to resume"),
    (["distill", "--student", "{model}", "--out", "{used}"], "already exists and is not empty"),
    (["distill", "--student", "{model}", "--out", "{out}", "--checkpoint-every", "-1"], "--checkpoint-every"),
    (["distill", "--student", "{model}", "--out", "{out}", "--steps", "0"], "--steps"),
    (["run", str(RECIPE), "--resume", "--out", "{out}"], "nothing to resume"),
    (["run", str(RECIPE), "--resume"], "--resume needs --out"),
    (["generate", "--model", "{model}", "--kv-cache", "quantized:bits=abc", "hi"], "bits must be an integer, got 'abc'"),
    (["eval", "--model", "{model}", "--kv-cache", "sentence_tier:max_sentence=abc", "--out", "{out}"],
     "max_sentence must be an integer"),
    (["generate", "--model", "{model}", "--kv-cache", "heavy_hitter+int5", "hi"], "must be +int8, +int4, +int3 or +int2"),
    (["generate", "--model", "{model}", "--kv-cache", "quantized+int4", "hi"], "set its width as quantized:bits=4"),
    (["eval", "--model", "leanlm-test/no-such-model", "--out", "{out}"], "hub is unreachable"),
    (["eval", "--model", "{model}", "--window", "8192", "--out", "{out}"], "longer than the model's context of 4,096"),
    (["generate", "--model", "{model}", LONG_PROMPT], "past the model's context of 4,096 tokens"),
    (["generate", "--model", "{model}", "--max-new-tokens", "5000", "hi"], "leaves no room for a prompt"),
    (["prune", "--model", "{model}", "--fraction", "0.1", "--layout", "uniform", "--scorer", "magnitude", "--out", "{out}"],
     "nothing would be pruned"),
    (["eval", "--model", "{model}", "--out", "{out}", "@EMPTY_DATA"], "LEANLM_DATA_DIR is set to"),
    (["analyze", "--scorers", "kl,vibes", "--out", "{out}"], "unknown scorer 'vibes'"),
    (["prune", "--scorer", "vibes", "--out", "{out}"], "scorer' must be one of kl, magnitude, taylor, got 'vibes'"),
    (["kv-budget", "--heads", "9", "--kv-heads", "2"], "multiple of KV heads"),
    (["eval", "--model", "no-such-model", "--out", "{out}"], "unknown model 'no-such-model'"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,fragment", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_inputs(tmp_path, tiny_model_dir, argv, fragment):
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    used = tmp_path / "used"
    used.mkdir()
    (used / "results.json").write_text("{}")
    env = {}
    if "@EMPTY_DATA" in argv:
        (tmp_path / "empty-data").mkdir()
        env["LEANLM_DATA_DIR"] = str(tmp_path / "empty-data")
        argv = [a for a in argv if a != "@EMPTY_DATA"]
    subst = {"{out}": tmp_path / "out", "{model}": tiny_model_dir, "{file}": plain, "{used}": used}
    resolved = []
    for arg in argv:
        for key, value in subst.items():
            arg = arg.replace(key, str(value))
        resolved.append(arg)
    before = sorted(p.name for p in tmp_path.iterdir())
    done = cli(*resolved, env=env, cwd=tmp_path)
    assert_one_line_error(done, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder, nothing else
    assert [p.name for p in used.iterdir()] == ["results.json"] and plain.read_text() == "not a folder"


def test_bad_inputs_fail_before_torch(tmp_path):
    """Plain mistakes are refused before torch is imported (well under the seconds an import takes)."""
    code = ("import sys; from leanlm import cli; code = cli.main(['prune', '--fraction', '2', '--out', 'x']); "
            "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=os.environ | {"PYTHONPATH": str(SRC)}, timeout=60)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr


# --------------------------------------------------------------------------- item 1: saved dtype, smaller files


def test_prune_saves_in_the_source_dtype_and_is_smaller(tmp_path, bf16_model_dir):
    out = tmp_path / "pruned"
    done = cli("prune", "--model", bf16_model_dir, "--out", out, "--fraction", "0.5", "--layout", "uniform",
               "--scorer", "magnitude", "--calib-samples", "1", "--calib-len", "8")
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    saved, source = weight_bytes(out / "model"), weight_bytes(bf16_model_dir)
    assert saved < source  # half the heads of 2 layers gone, and not widened to float32
    record = json.loads((out / "prune.json").read_text())
    assert record["weight_bytes"] == {"saved": saved, "source": source, "dtype": "bfloat16"}
    assert f"{saved:,} bytes, bfloat16" in done.stdout and f"{source:,} bytes" in done.stdout


def test_dtype_flag_of_prune_export_distill(tmp_path, tiny_model_dir, bf16_model_dir):
    out = tmp_path / "pruned32"
    assert cli("prune", "--model", bf16_model_dir, "--out", out, "--fraction", "0.5", "--layout", "uniform",
               "--scorer", "magnitude", "--dtype", "float32").returncode == 0
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "float32"
    exported = tmp_path / "exported"
    done = cli("export", "--model", tiny_model_dir, "--out", exported, "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    assert weight_bytes(exported) < weight_bytes(tiny_model_dir)  # float32 source, bf16 on request
    distilled = tmp_path / "distilled"
    done = cli("distill", "--student", bf16_model_dir, "--teacher", tiny_model_dir, "--out", distilled, "--steps", "1",
               "--seq-len", "16", "--batch-size", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads((distilled / "model" / "config.json").read_text())["dtype"] == "bfloat16"  # the student's


# --------------------------------------------------------------------------- item 3: distill stop / resume


def _distill_args(student, teacher, out, *extra):
    return ("distill", "--student", student, "--teacher", teacher, "--out", out, "--lora-rank", "4", "--seq-len", "16",
            "--batch-size", "1", *extra)


def _merged_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_resume_matches_uninterrupted(tmp_path, tiny_model_dir, bf16_model_dir, signame):
    import signal

    import torch

    steps = "12"
    whole = tmp_path / "whole"
    done = cli(*_distill_args(bf16_model_dir, tiny_model_dir, whole, "--steps", steps, "--dtype", "float32"))
    assert done.returncode == 0, done.stderr

    cut = tmp_path / "cut"
    args = [sys.executable, "-m", "leanlm.cli", *map(str, _distill_args(bf16_model_dir, tiny_model_dir, cut, "--steps",
                                                                          steps, "--checkpoint-every", "1", "--dtype", "float32"))]
    env = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(cut.glob("checkpoint/step-*/state.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "checkpoint saved" in last and "--resume" in last, stderr
    step = int(sorted(cut.glob("checkpoint/step-*"))[-1].name.split("-")[1])
    assert 1 <= step < int(steps) and not (cut / "model").exists()

    done = cli(*_distill_args(bf16_model_dir, tiny_model_dir, cut, "--resume", "--dtype", "float32"))
    assert done.returncode == 0, done.stderr
    assert json.loads((cut / "distill.json").read_text())["resumed_from"] == step
    a, b = _merged_state(whole / "model"), _merged_state(cut / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_resume_wording_and_finished_runs(tmp_path, tiny_model_dir, bf16_model_dir):
    out = tmp_path / "run"
    assert cli(*_distill_args(bf16_model_dir, tiny_model_dir, out, "--steps", "2", "--checkpoint-every", "1")).returncode == 0
    again = cli(*_distill_args(bf16_model_dir, tiny_model_dir, out, "--steps", "2"))
    assert_one_line_error(again, "pass --resume to continue that run")
    assert "resume=True" not in again.stderr
    finished = cli(*_distill_args(bf16_model_dir, tiny_model_dir, out, "--resume"))
    assert_one_line_error(finished, "already finished all 2 steps")
    longer = cli(*_distill_args(bf16_model_dir, tiny_model_dir, out, "--resume", "--steps", "4"))
    assert_one_line_error(longer, "cosine learning-rate schedule ended at 0 at step 2")
    assert f"--student {out}/model" in longer.stderr
    other = cli(*_distill_args(bf16_model_dir, tiny_model_dir, out, "--resume", "--alpha", "0.9"))
    assert_one_line_error(other, "was started with --alpha 0.5")


# --------------------------------------------------------------------------- item 4: values not silently replaced


def test_prune_says_what_the_fraction_becomes(tmp_path, tiny_model_dir):
    out = tmp_path / "p"
    done = cli("prune", "--model", tiny_model_dir, "--out", out, "--fraction", "0.3", "--layout", "uniform",
               "--scorer", "magnitude")
    assert done.returncode == 0, done.stderr
    assert "removes 2 of 4 query heads per layer = 50.0%" in done.stderr and "nearest fractions: 0, 0.5" in done.stderr
    record = json.loads((out / "prune.json").read_text())
    removed = record["transform"]["removed"]
    assert removed["fraction_requested"] == 0.3 and removed["fraction_achieved"] == 0.5


def test_kv_budget_below_what_a_policy_holds_is_reported(tmp_path, tiny_model_dir):
    out = tmp_path / "kv"
    done = cli("eval", "--model", tiny_model_dir, "--dtype", "float32", "--out", out, "--kv-cache", "quantized:group=16",
               "--kv-budget", "0.01", "--kv-context", "128", "--kv-chunk", "32", "--max-tokens", "256")
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["kv_budget"] == 0.01 and results["kv_budget_held"] == pytest.approx(results["bytes_ratio"])
    assert results["kv_budget_held"] > 0.05  # even 2-bit KIVI holds far more than 1%
    assert "below what quantized:group=16 can hold" in done.stderr
    held = f"{results['kv_budget_held']:.3g}"
    assert f"budget 0.01 requested, {held} held" in (out / "report.md").read_text()
    assert (out / "plots" / "kv_windows.png").stat().st_size > 0  # eval --kv-cache now plots too
    assert results["protocol"]["data"]["sha256"]


# --------------------------------------------------------------------------- item 5: data provenance


def test_results_record_the_data_file_and_its_hash(tmp_path, tiny_model_dir):
    from leanlm.data import find_split_file

    out = tmp_path / "e"
    done = cli("eval", "--model", tiny_model_dir, "--out", out, "--max-tokens", "300", "--window", "128", "--no-speed")
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "results.json").read_text())["protocol"]["data"]
    path = find_split_file("test")
    assert data["path"] == str(path.resolve()) and data["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for name in ("results.json", "report.md"):  # item 8: ordinary file modes, like every other output
        assert stat.S_IMODE((out / name).stat().st_mode) & 0o044 == 0o044


# --------------------------------------------------------------------------- item 7: context length


def test_generate_truncate_keeps_the_prompt_tail(tmp_path, tiny_model_dir):
    done = cli("generate", "--model", tiny_model_dir, "--max-new-tokens", "2", "--truncate", LONG_PROMPT + "end")
    assert done.returncode == 0, done.stderr
    assert "prompt cut to its last 4094 of" in done.stderr


# --------------------------------------------------------------------------- item 8: help, reports, cards


def test_help_has_examples_defaults_and_version():
    from leanlm.cli import build_parser

    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("leanlm ")
    for command in build_parser()._subparsers._group_actions[0].choices:
        helped = cli(command, "--help")
        assert helped.returncode == 0 and "examples:\n  leanlm " + command in helped.stdout, command
    assert "(default: kl,magnitude,taylor)" in " ".join(cli("analyze", "--help").stdout.split())
    prune = " ".join(cli("prune", "--help").stdout.split())
    assert "(default: 8)" in prune and "(default: 128)" in prune
    assert "(default: 3)" in " ".join(cli("eval", "--help").stdout.split())
    distill = " ".join(cli("distill", "--help").stdout.split())
    assert "(default: no limit)" in distill and "(default: 0)" in distill and "--checkpoint-every" in distill
    assert "with --kv-cache, logs the cache bytes" in " ".join(cli("generate", "--help").stdout.split())


def test_prune_record_card_modes_and_export_history(tmp_path, bf16_model_dir):
    out = tmp_path / "p"
    assert cli("prune", "--model", bf16_model_dir, "--out", out, "--fraction", "0.5", "--layout", "uniform",
               "--scorer", "magnitude").returncode == 0
    record = json.loads((out / "prune.json").read_text())
    assert Path(record["export"]["path"]) == out / "model" and (out / "model" / "config.json").is_file()
    card = (out / "model" / "README.md").read_text()
    assert "| parameters |" in card and "| query heads removed | 50.00% |" in card
    for path in [out / "prune.json", out / "model" / "model.safetensors", out / "model" / "README.md"]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # group/other may read, as elsewhere
    exported = tmp_path / "x"
    assert cli("export", "--model", out / "model", "--out", exported).returncode == 0
    history = (exported / "README.md").read_text()
    assert "Removed 50.0% of the query heads" in history and "Exported" in history and "| weights |" in history
    assert stat.S_IMODE((exported / "model.safetensors").stat().st_mode) & 0o044 == 0o044


def test_analyze_magnitude_says_it_read_no_text(tmp_path, tiny_model_dir):
    out = tmp_path / "a"
    done = cli("analyze", "--model", tiny_model_dir, "--out", out, "--scorers", "magnitude")
    assert done.returncode == 0, done.stderr
    calibration = json.loads((out / "results.json").read_text())["calibration"]
    assert calibration["num_samples"] == 0 and "read the weights only" in calibration["note"]
