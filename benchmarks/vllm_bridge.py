"""decode_speed.py's side of vLLM's CPU build: one persistent benchmarks/vllm_driver.py subprocess in the
vLLM venv (benchmarks/vllm_env.sh), started on first use and asked for one measurement at a time, so
its rows alternate with leanlm's like every other method. Records why it cannot run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


class VLLM:
    def __init__(self, venv: Path, model: str, max_len: int, max_batch: int, threads: int):
        self.python, self.max_len, self.max_batch, self.threads = venv / "bin" / "python", max_len, max_batch, threads
        self.proc, self.skipped, self.version = None, {}, None
        if not self.python.exists():
            self.skipped["vllm_bf16"] = f"no vLLM venv at {venv}: run `bash benchmarks/vllm_env.sh`"
            return
        from leanlm.models.loading import resolve_source

        self.model_dir = resolve_source(model)[0]

    def start(self) -> None:
        # The work-arounds of vllm_env.sh: both cores for its OpenMP threads, KV space sized, not a NUMA node's share.
        cores = f"0-{self.threads - 1}"
        env = os.environ | {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": "2"}
        self.log = open(HERE.parent / "out" / "vllm_driver.log", "w")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen([str(self.python), str(HERE / "vllm_driver.py"), "--model", str(self.model_dir),
                                      "--max-len", str(self.max_len), "--max-batch", str(self.max_batch)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.version = self.answer()["vllm"]

    def answer(self) -> dict:
        for line in self.proc.stdout:  # vLLM may print to stdout too: the answer is the JSON line
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the vLLM driver exited (code {self.proc.wait()}); see out/vllm_driver.log")

    def __call__(self, ids, new: int) -> dict | None:
        if self.skipped:
            return None
        if self.proc is None:
            (HERE.parent / "out").mkdir(exist_ok=True)
            self.start()
        self.proc.stdin.write(json.dumps({"ids": ids.tolist(), "new": new}) + "\n")
        self.proc.stdin.flush()
        result = self.answer()
        return {"steps_per_s": result["steps_per_s"], "tokens": result["tokens"],
                "note": f"vLLM CPU {self.version} (offline LLM, prefix caching off), decode = t(N) - t(1)"}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(60)
