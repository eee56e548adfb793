"""decode_speed.py's side of llama.cpp: find the venv and GGUF files, write the BF16 GGUF once, and run
benchmarks/llamacpp_driver.py as a subprocess per measurement. Records why a method cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUANTIZED = {"llamacpp_q8_0": 7, "llamacpp_q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0


class LlamaCpp:
    def __init__(self, venv: Path, gguf_dir: Path, model: str, threads: int):
        self.python = venv / "bin" / "python"
        self.threads, self.skipped, self.files = threads, {}, {}
        if not self.python.exists() or subprocess.run([str(self.python), "-c", "import llama_cpp"],
                                                      capture_output=True).returncode != 0:
            why = f"no llama_cpp in {venv}: run `nice -n 19 bash benchmarks/llamacpp_env.sh` (builds ~17 min)"
            self.skipped = {name: why for name in ("llamacpp_bf16", "llamacpp_q4_1", *QUANTIZED)}
            return
        from leanlm.models.loading import BUNDLED, resolve_source

        if model in BUNDLED:
            self.files["llamacpp_q4_1"] = BUNDLED[model].path()
        else:
            self.skipped["llamacpp_q4_1"] = f"{model} has no bundled Q4_1 GGUF"
        try:
            self.files["llamacpp_bf16"] = self.convert(venv, Path(resolve_source(model)[0]), gguf_dir)
        except (subprocess.CalledProcessError, FileNotFoundError, StopIteration) as error:
            self.skipped["llamacpp_bf16"] = f"BF16 GGUF conversion failed: {error}"[:300]
            return
        for name, ftype in QUANTIZED.items():
            try:
                self.files[name] = self.quantize(self.files["llamacpp_bf16"], name.split("_", 1)[1], ftype)
            except subprocess.CalledProcessError as error:
                self.skipped[name] = f"llama.cpp's quantizer failed: {error}"[:300]

    def quantize(self, bf16: Path, kind: str, ftype: int) -> Path:
        """llama.cpp's own quantizer (llama_model_quantize) on the BF16 GGUF: Q8_0 / Q4_0 files made from
        the same weights as leanlm's int8 / int4 rows (the bundled Q4_1 file crashes some builds)."""
        target = bf16.with_name(bf16.name.replace("-bf16.gguf", f"-{kind}.gguf"))
        if not target.exists():
            code = ("import ctypes, sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                    "p.ftype = int(sys.argv[3]); p.nthread = 2; "
                    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")
            subprocess.run([str(self.python), "-c", code, str(bf16), str(target), str(ftype)], check=True, capture_output=True)
        return target

    def convert(self, venv: Path, model_dir: Path, gguf_dir: Path) -> Path:
        """llama.cpp's own convert_hf_to_gguf.py (from the sdist kept in the venv) → BF16 GGUF."""
        target = gguf_dir / f"{model_dir.name}-bf16.gguf"
        if target.exists():
            return target
        vendor = next((venv / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
        gguf_dir.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"PYTHONPATH": str(vendor / "gguf-py")}  # the converter's own gguf writer
        subprocess.run([sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16",
                        "--outfile", str(target)], check=True, env=env, capture_output=True)
        return target

    def __call__(self, name: str, ids, new: int) -> dict | None:
        if name not in self.files:
            return None
        if ids.shape[0] != 1:
            self.skipped[f"{name} (batch > 1)"] = ("llama-cpp-python's Llama decodes one sequence; batched decode "
                                                    "needs llama.cpp's server or batched example (not driven here)")
            return None
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(ids[0].tolist(), handle)
        try:
            plain = name == "llamacpp_bf16"  # quantized files: no AMX / repacked buffers (they crash on some machines)
            done = subprocess.run([str(self.python), str(HERE / "llamacpp_driver.py"), "--gguf", str(self.files[name]),
                                   "--ids", handle.name, "--new", str(new), "--threads", str(self.threads)]
                                  + ([] if plain else ["--no-extra-bufts"]), check=True, capture_output=True, text=True)
        finally:
            os.unlink(handle.name)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        size = Path(self.files[name]).stat().st_size
        return {"steps_per_s": result["steps_per_s"], "weight_bytes": size,
                "note": f"llama.cpp {result['llama_cpp']}, GGUF {size / 2**20:.0f} MiB, F16 KV cache"
                        + ("" if plain else ", use_extra_bufts off")}
