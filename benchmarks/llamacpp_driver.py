"""Run inside the llama.cpp venv (benchmarks/llamacpp_env.sh): greedy-decode after a given prompt and
print one JSON line with the decode rate (first to last new token; prompt evaluation excluded).

    .venv-llamacpp/bin/python benchmarks/llamacpp_driver.py --gguf F.gguf --ids ids.json --new 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import llama_cpp


def without_extra_bufts() -> None:
    """Every model this process loads gets use_extra_bufts=False (Llama() has no argument for it)."""
    import llama_cpp.llama as module

    default = llama_cpp.llama_model_default_params

    def params():
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    llama_cpp.llama_model_default_params = module.llama_cpp.llama_model_default_params = params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--ids", required=True, help="JSON file holding one list of prompt token ids")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-extra-bufts", action="store_true",
                        help="llama.cpp's use_extra_bufts off (no AMX / repacked weight buffers): its quantized "
                             "types crash with them on some AVX-512 machines (SIGSEGV at load)")
    args = parser.parse_args()
    if args.no_extra_bufts:
        without_extra_bufts()
    prompt = json.load(open(args.ids))
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=len(prompt) + args.new + 8, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, logits_all=False, verbose=False)
    times, tokens = [], []
    start = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        tokens.append(token)
        if len(tokens) == args.new:
            break
    steps = (len(times) - 1) / (times[-1] - times[0])
    print(json.dumps({"steps_per_s": steps, "prefill_s": times[0] - start, "tokens": tokens,
                      "llama_cpp": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}))


if __name__ == "__main__":
    main()
