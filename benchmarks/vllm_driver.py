"""Run inside the vLLM venv (benchmarks/vllm_env.sh): one vLLM ``LLM`` kept loaded, timed on request.

    .venv-vllm/bin/python benchmarks/vllm_driver.py --model DIR --max-len 700 --max-batch 16

Reads one JSON line per measurement on stdin, {"ids": [[prompt ids], ...], "new": N}, and answers one
JSON line: the batch is generated greedily twice with prefix caching off, once for 1 new token (the
prefill and the first token) and once for N; decode steps/s = (N - 1) / (t_N - t_1), so the prompt's
prefill is excluded as in decode_speed.py's other rows. Prints {"ready": ...} once the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def timed(llm: LLM, prompts: list, new: int) -> tuple[float, list]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)  # ignore_eos: exactly N tokens
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-len", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_len, max_num_seqs=args.max_batch,
              enable_prefix_caching=False, gpu_memory_utilization=0.3, seed=0)
    import vllm

    print(json.dumps({"ready": True, "vllm": vllm.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["ids"]]
        first, _ = timed(llm, prompts, 1)
        total, tokens = timed(llm, prompts, request["new"])
        print(json.dumps({"steps_per_s": (request["new"] - 1) / (total - first), "prefill_s": first,
                          "total_s": total, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
