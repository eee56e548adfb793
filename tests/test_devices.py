"""Device plumbing on a CPU-only machine: auto, cpu, a clear error for cuda, synchronised timings."""

import pytest
import torch

from leanlm import cli
from leanlm.errors import LeanLMError
from leanlm.evaluate.speed import time_prefill
from leanlm.models import DEVICES, load_model, model_device, resolve_device, synced_clock, tiny_llama


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_resolves_to_cpu_without_cuda_and_to_cuda_with_it(no_cuda, monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cuda_without_cuda_and_unknown_devices_are_user_errors(no_cuda):
    with pytest.raises(LeanLMError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(LeanLMError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_cli_device_choices_are_the_library_s():
    assert cli.DEVICE_CHOICES == DEVICES


@pytest.mark.parametrize("command", [["eval", "--no-speed"], ["analyze"], ["prune", "--out", "OUT"],
                                     ["generate", "hello"], ["export", "--model", "smollm2-135m", "--out", "OUT"],
                                     ["distill", "--student", "smollm2-135m", "--out", "OUT"]])
def test_cuda_request_without_cuda_exits_2_before_any_work(command, no_cuda, capsys, tmp_path):
    argv = [tmp_path / "out" if part == "OUT" else part for part in command]
    assert cli.main([str(part) for part in argv] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err
    assert not (tmp_path / "out").exists()


def test_run_device_option_overrides_the_recipe(no_cuda, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndevice: cpu\n")
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_load_model_puts_the_model_on_the_device(tmp_path, no_cuda):
    tiny_llama().save_pretrained(tmp_path / "m")
    assert model_device(load_model(str(tmp_path / "m"), device="auto")) == torch.device("cpu")
    with pytest.raises(LeanLMError, match="no CUDA device"):
        load_model(str(tmp_path / "m"), device="cuda")


def test_timings_synchronise_a_cuda_device_and_not_the_cpu(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    synced_clock("cpu")
    synced_clock(None)
    assert synced == []
    synced_clock(torch.device("cuda", 0))
    assert synced == [torch.device("cuda", 0)]


def test_speed_timer_uses_the_synchronised_clock(monkeypatch):
    calls = []

    def clock(device=None):
        calls.append(device)
        return float(len(calls))  # every read is one second after the last

    monkeypatch.setattr("leanlm.evaluate.speed.synced_clock", clock)
    model = tiny_llama()
    tokens_per_s = time_prefill(model, length=8, warmup=1, repeats=3)
    assert calls == [torch.device("cpu")] * 7  # warm-up start + 3 x (start, end): no unsynchronised read
    assert tokens_per_s == pytest.approx(8.0)  # 8 tokens in the 1 "second" between a start and its end
