"""Load benchmark of `leanlm serve` (and of any OpenAI-compatible server): the metrics `vllm bench serve` reports.

    .venv/bin/python benchmarks/serve_load.py --out runs/serve/serve_load.json \
        --pruned-model runs/serve/pruned25/model --requests 16 --output-tokens 64

For each row (the original bf16 model, a pruned model, a compressed KV cache, or an external server
given as NAME=URL with --external) it starts `leanlm serve` as a subprocess on 127.0.0.1, drives it
with the official `openai` client (streaming completions, greedy, `ignore_eos` so every request
generates exactly --output-tokens) at each concurrency level, and records per request the time to
first token (TTFT), time per output token after the first (TPOT), inter-token latencies (ITL: between
consecutive streamed chunks) and end-to-end latency (E2E), then p50/p95/p99, request and output-token
throughput and failures per level. Prompts are distinct WikiText-2 test passages of --prompt-tokens.
The machine is shared: the JSON records the load average before and after each row; compare rows
and levels as ratios from this one run, not as absolute speeds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from leanlm.report.results import atomic_write_json, git_info, versions  # noqa: E402

TARGETS = {"p95_tpot_ms_at_2": 120.0, "throughput_8_over_1": 3.0, "p95_tpot_8_over_1": 2.0}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:  # linear interpolation, as numpy's default
        pos = (len(ordered) - 1) * q
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {"mean": statistics.fmean(ordered), "p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99)}


def prompts(tokenizer, count: int, length: int) -> list[str]:
    """``count`` distinct passages of WikiText-2 test, each about ``length`` tokens."""
    from leanlm.data.wikitext import wikitext_text

    ids = tokenizer(wikitext_text("test")[:2_000_000])["input_ids"]
    return [tokenizer.decode(ids[i * length: (i + 1) * length]) for i in range(count)]


def start_leanlm(row: dict, threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "leanlm.cli", "serve", "--model", row["model"], "--port", "0", "--threads",
           str(threads), "--max-batch", str(row.get("max_batch", 8)), "--max-queue", str(row.get("max_queue", 64)),
           *row.get("args", [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("serving on "):
        proc.kill()
        raise RuntimeError(f"leanlm serve did not start: {log_path.read_text()[-500:]}")
    url = line.split()[-1]
    wait_ready(url)
    row["command"] = " ".join(cmd)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then kill if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(url: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    times, tokens = [], None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if not times:
        raise RuntimeError("no tokens streamed")
    tokens = tokens or len(times)
    ttft = times[0] - start
    return {"ttft": ttft, "e2e": end - start, "tokens": tokens, "prompt_chars": len(prompt),
            "tpot": (end - start - ttft) / (tokens - 1) if tokens > 1 else None,
            "itl": [b - a for a, b in zip(times, times[1:])]}


def drive(url: str, model: str, prompt_list: list[str], concurrency: int, count: int, max_tokens: int,
          max_seconds: float) -> dict:
    """``count`` requests, ``concurrency`` at a time, stopping new ones after ``max_seconds``."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    results, failures, lock = [], [], threading.Lock()
    next_index = iter(range(count))
    start = time.perf_counter()

    def worker():
        while True:
            with lock:
                index = next(next_index, None)
            if index is None or time.perf_counter() - start > max_seconds:
                return
            try:
                result = one_request(client, model, prompt_list[index % len(prompt_list)], max_tokens)
                with lock:
                    results.append(result)
            except Exception as error:  # noqa: BLE001 - a failure is a measured outcome
                with lock:
                    failures.append(f"{type(error).__name__}: {str(error)[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    out_tokens = sum(r["tokens"] for r in results)
    ms = lambda xs: {k: v * 1000 for k, v in percentiles(xs).items()}  # noqa: E731
    return {"concurrency": concurrency, "completed": len(results), "failed": len(failures),
            "failures": failures[:5], "duration_s": duration, "output_tokens": out_tokens,
            "request_throughput": len(results) / duration, "output_throughput": out_tokens / duration,
            "ttft_ms": ms([r["ttft"] for r in results]), "tpot_ms": ms([r["tpot"] for r in results if r["tpot"]]),
            "itl_ms": ms([x for r in results for x in r["itl"]]), "e2e_ms": ms([r["e2e"] for r in results])}


def run_row(row: dict, args, prompt_list: list[str], out_dir: Path, on_level=None) -> dict:
    row = dict(row)
    row["load_before"] = os.getloadavg()
    proc = None
    try:
        if row.get("url"):
            url = row["url"]
            wait_ready(url)
        else:
            proc, url = start_leanlm(row, args.threads, out_dir / f"serve-{row['name']}.log")
        name = row.get("served_name", row.get("model"))
        drive(url, name, prompt_list, 1, 2, min(8, args.output_tokens), 120)  # warm-up, not recorded
        row["levels"] = []
        for concurrency in args.concurrency:
            level = drive(url, name, prompt_list, concurrency, args.requests, args.output_tokens, args.max_seconds)
            print(f"{row['name']} c={concurrency}: {level['output_throughput']:.1f} tok/s, p95 TPOT "
                  f"{level['tpot_ms'].get('p95', float('nan')):.1f} ms, p95 TTFT {level['ttft_ms'].get('p95', float('nan')):.0f} ms, "
                  f"failed {level['failed']}", flush=True)
            row["levels"].append(level)
            if on_level is not None:
                on_level(row)  # a run stopped later keeps the levels it measured
        if proc is not None:
            row["metrics_scrape"] = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                                     if line.startswith(("leanlm_cache", "leanlm_requests_total"))]
    except Exception as error:  # noqa: BLE001 - record why a row could not run, keep the others
        row["error"] = f"{type(error).__name__}: {error}"
        print(f"{row['name']}: {row['error']}", flush=True)
    finally:
        if proc is not None:
            stop(proc)
    row["load_after"] = os.getloadavg()
    row["targets"] = check_targets(row)
    return row


def overload(args, prompt_list: list[str], out_dir: Path) -> dict:
    """A burst of ``args.overload`` simultaneous streaming requests against a leanlm server with a small
    batch and queue (4 and 8): how many were served, how many got 429 (and their Retry-After), whether any
    failed otherwise, and whether the server still answers afterwards."""
    import openai

    row = {"name": "overload", "model": args.model, "max_batch": 4, "max_queue": 8, "args": ["--dtype", "bfloat16"]}
    proc, url = start_leanlm(row, args.threads, out_dir / "serve-overload.log")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    outcomes, lock = [], threading.Lock()

    def one(index: int) -> None:
        try:
            one_request(client, args.model, prompt_list[index % len(prompt_list)], 32)
            outcome = ("served", None)
        except openai.RateLimitError as error:
            outcome = ("429", error.response.headers.get("retry-after"))
        except Exception as error:  # noqa: BLE001 - anything but a 429 is a failure to report
            outcome = ("failed", f"{type(error).__name__}: {str(error)[:200]}")
        with lock:
            outcomes.append(outcome)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.overload)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = one_request(client, args.model, prompt_list[0], 8)
        return {"requests": args.overload, "max_batch": 4, "max_queue": 8,
                "served": sum(o[0] == "served" for o in outcomes), "rejected_429": sum(o[0] == "429" for o in outcomes),
                "retry_after": sorted({str(o[1]) for o in outcomes if o[0] == "429"}),
                "failed": [o[1] for o in outcomes if o[0] == "failed"],
                "health_after": httpx.get(f"{url}/health").status_code, "served_after_burst": after["tokens"] > 0}
    finally:
        stop(proc)


def level(row: dict, concurrency: int) -> dict | None:
    return next((lv for lv in row.get("levels", []) if lv["concurrency"] == concurrency and lv["completed"]), None)


def check_targets(row: dict) -> dict:
    one, two, eight = level(row, 1), level(row, 2), level(row, 8)
    out = {}
    if two:
        out["p95_tpot_ms_at_2"] = {"value": two["tpot_ms"]["p95"], "goal": "<= 120",
                                   "met": two["tpot_ms"]["p95"] <= TARGETS["p95_tpot_ms_at_2"]}
    if one and eight:
        thr = eight["output_throughput"] / one["output_throughput"]
        tpot = eight["tpot_ms"]["p95"] / one["tpot_ms"]["p95"]
        out["throughput_8_over_1"] = {"value": thr, "goal": ">= 3", "met": thr >= TARGETS["throughput_8_over_1"]}
        out["p95_tpot_8_over_1"] = {"value": tpot, "goal": "<= 2", "met": tpot <= TARGETS["p95_tpot_8_over_1"]}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for index, row in enumerate(rows):
        color = f"C{index}"
        levels = [lv for lv in row.get("levels", []) if lv["completed"]]
        if not levels:
            continue
        xs = [lv["concurrency"] for lv in levels]
        axes[0].plot(xs, [lv["tpot_ms"]["p95"] for lv in levels], "o-", color=color, label=f"{row['name']} p95")
        axes[0].plot(xs, [lv["tpot_ms"]["p50"] for lv in levels], "o--", color=color, alpha=0.5, label=f"{row['name']} p50")
        axes[1].plot(xs, [lv["ttft_ms"]["p95"] for lv in levels], "o-", color=color, label=row["name"])
        axes[2].plot(xs, [lv["output_throughput"] for lv in levels], "o-", color=color, label=row["name"])
    axes[0].axhline(TARGETS["p95_tpot_ms_at_2"], color="gray", ls=":", label="120 ms goal")
    for ax, title in zip(axes, ("time per output token (ms)", "p95 time to first token (ms)", "output tokens/s")):
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.suptitle("leanlm serve load test (shared 2-core CPU: compare ratios)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (a PNG plot goes next to it)")
    parser.add_argument("--model", default="smollm2-135m", help="the original model (default: %(default)s)")
    parser.add_argument("--pruned-model", default=None, help="a pruned (and recovered) model directory: one more row")
    parser.add_argument("--kv-cache", default="quantized", help="policy of the compressed-cache row ('' to skip)")
    parser.add_argument("--kv-budget", type=float, default=0.25)
    parser.add_argument("--external", action="append", default=[], metavar="NAME=URL=MODEL",
                        help="an already running OpenAI-compatible server to drive too (e.g. vLLM)")
    parser.add_argument("--rows", default=None, help="comma list of row names to run (default: all)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=300, help="no new request after this long, per level")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--overload", type=int, default=0,
                        help="also fire this many simultaneous requests at a server with batch 4 and queue 8 (429s expected)")
    parser.add_argument("--note", default="", help="a sentence about this run's conditions, kept in the JSON")
    args = parser.parse_args(argv)

    from leanlm.models import load_tokenizer

    rows = [{"name": "bf16", "model": args.model, "args": ["--dtype", "bfloat16"]}]
    if args.pruned_model:
        rows.append({"name": "pruned", "model": args.pruned_model, "args": ["--dtype", "bfloat16"]})
    if args.kv_cache:
        rows.append({"name": f"bf16+{args.kv_cache}@{args.kv_budget}", "model": args.model,
                     "args": ["--dtype", "bfloat16", "--kv-cache", args.kv_cache, "--kv-budget", str(args.kv_budget)]})
    for spec in args.external:
        name, url, model = spec.split("=", 2)
        rows.append({"name": name, "url": url, "served_name": model})
    if args.rows:
        rows = [r for r in rows if r["name"] in args.rows.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prompt_list = prompts(load_tokenizer(args.model), max(args.requests, 16), args.prompt_tokens)
    report = {"benchmark": "serve_load", "protocol": {
        "prompts": f"{len(prompt_list)} distinct WikiText-2 test passages of {args.prompt_tokens} tokens",
        "output_tokens": args.output_tokens, "requests_per_level": args.requests, "concurrency": args.concurrency,
        "sampling": "greedy, ignore_eos", "client": "openai (streaming completions), one thread per concurrent request",
        "server_threads": args.threads, "max_seconds_per_level": args.max_seconds,
        "tpot": "(e2e - ttft) / (output tokens - 1) per request", "itl": "time between consecutive streamed chunks"},
        "machine": {"cpus": os.cpu_count(), "shared": True,
                    "note": "2-core CPU shared with other jobs (load average recorded per row): compare ratios from "
                            "this one run, not absolute speeds", "load_average_at_start": os.getloadavg(), "run_note": args.note},
        "targets": TARGETS, "versions": versions(), "git": git_info(), "rows": []}
    for index, row in enumerate(rows):
        def partial(done: dict, index: int = index) -> None:
            report["rows"][index:] = [{**done, "partial": True}]
            atomic_write_json(args.out, report)

        finished = run_row(row, args, prompt_list, args.out.parent, partial)
        report["rows"][index:] = [finished]
        atomic_write_json(args.out, report)  # after every row: a stopped run keeps what it measured
    if args.overload:
        report["overload"] = overload(args, prompt_list, args.out.parent)
        print(f"overload: {report['overload']}", flush=True)
        atomic_write_json(args.out, report)
    plot(report["rows"], args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
