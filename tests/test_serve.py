"""`leanlm serve` over real HTTP: uvicorn on 127.0.0.1 (ephemeral port), the official `openai` client.

A tiny random Llama with the real tokenizer's vocabulary stands in for the model. Timing-dependent
behaviour (a full queue, interleaving, disconnects) is made deterministic with a forward pre-hook
that either blocks the scheduler's forwards (``gate``) or slows them down (``delay``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from leanlm.engine import generate  # noqa: E402
from leanlm.models import tiny_llama  # noqa: E402
from leanlm.serve.scheduler import SchedulerConfig  # noqa: E402
from leanlm.serve.server import bound_socket, build_served, make_server  # noqa: E402
from leanlm.serve.text import chat_prompt  # noqa: E402

MAX_LEN = 128


class Throttle:
    """A forward pre-hook: blocks while ``gate`` is clear, sleeps ``delay`` seconds per forward."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0

    def __call__(self, module, args):
        self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)


def start(served):
    """Run ``served`` under uvicorn in a thread on an ephemeral port → (url, server, thread)."""
    sock = bound_socket()
    server = make_server(served, shutdown_timeout=2)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def tiny_for(tokenizer):
    torch.manual_seed(0)
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)


@pytest.fixture(scope="module")
def live(real_tokenizer):
    model = tiny_for(real_tokenizer)
    throttle = Throttle()
    handle = model.register_forward_pre_hook(throttle)
    served = build_served(model, real_tokenizer, "tiny", SchedulerConfig(max_batch=2, max_queue=3, max_len=MAX_LEN,
                                                                         prefill_chunk=8))
    url, server, thread = start(served)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    yield {"url": url, "client": client, "served": served, "model": model, "tok": real_tokenizer, "throttle": throttle}
    server.should_exit = True
    thread.join(10)
    handle.remove()


def engine_text(live, ids: list[int], new: int) -> tuple[str, list[int]]:
    tokens = generate(live["model"], torch.tensor([ids]), new)[0].tolist()
    return live["tok"].decode(tokens, skip_special_tokens=True), tokens


def idle(live, timeout: float = 5.0) -> bool:
    """Wait until no sequence runs or waits and every slot is free."""
    scheduler = live["served"].scheduler
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not scheduler.running and not scheduler.waiting and len(scheduler.backend.free) == scheduler.backend.slots:
            return True
        time.sleep(0.02)
    return False


PROMPT = [1, 504, 3458, 282, 4649, 314, 2491, 28, 260, 1345]


def test_completion_matches_engine_greedy_stream_and_not(live):
    want, tokens = engine_text(live, PROMPT, 12)
    out = live["client"].completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (10, 12, 22)
    chunks = list(live["client"].completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len(set(tokens)) > 1  # the comparison is not between two constant streams


def test_text_prompt_and_chat_match_engine(live):
    tok = live["tok"]
    ids = tok("The capital of France is")["input_ids"]
    out = live["client"].completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == engine_text(live, ids, 8)[0] and out.usage.prompt_tokens == len(ids)
    from leanlm.serve.schema import Message

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat_ids = chat_prompt(tok, [Message(**m) for m in messages])
    assert "Hello there" in tok.decode(chat_ids) and chat_ids != tok("Hello there")["input_ids"]
    want = engine_text(live, chat_ids, 10)[0]
    out = live["client"].chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(chat_ids) and out.usage.completion_tokens == 10
    stream = live["client"].chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_framing_done_and_stop_string(live):
    want, _ = engine_text(live, PROMPT, 16)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live['url']}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads) == want
    stop = want.strip()[3:6]  # a stop string from the middle of the greedy text
    out = live["client"].completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                            extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == want[: want.index(stop)]
    assert idle(live)


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(live):
    args = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
                extra_body={"ignore_eos": True, "top_k": 50})
    first = live["client"].completions.create(**args).choices[0].text
    assert live["client"].completions.create(**args).choices[0].text == first
    other = live["client"].completions.create(**{**args, "seed": 8}).choices[0].text
    assert first != other or first != engine_text(live, PROMPT, 12)[0]


def test_two_streams_interleave(live):
    live["throttle"].delay = 0.01
    events: list[tuple[int, str]] = []
    lock = threading.Lock()

    def run(index: int):
        stream = live["client"].completions.create(model="tiny", prompt=PROMPT[: 5 + index], max_tokens=30,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            with lock:
                events.append((index, "finish" if chunk.choices[0].finish_reason else "token"))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        live["throttle"].delay = 0.0
    first_finish = min(i for i, e in enumerate(events) if e[1] == "finish")
    progressed = {index for index, kind in events[:first_finish] if kind == "token"}
    assert progressed == {0, 1}, events[:first_finish]
    assert live["served"].scheduler.metrics.ttft.counts  # the histograms saw them


def test_full_queue_returns_429_then_recovers(live):
    throttle, served = live["throttle"], live["served"]
    throttle.gate.clear()  # the scheduler blocks in its next forward: nothing leaves the queue
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    results: list[int] = []

    def post():
        results.append(httpx.post(f"{live['url']}/v1/completions", json=body, timeout=30).status_code)

    try:
        first = threading.Thread(target=post)
        first.start()
        end = time.monotonic() + 5
        while not served.scheduler.running and time.monotonic() < end:
            time.sleep(0.01)
        waiting = [threading.Thread(target=post) for _ in range(3)]  # max_queue = 3
        for t in waiting:
            t.start()
        while len(served.scheduler.waiting) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        refused = httpx.post(f"{live['url']}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        throttle.gate.set()
    for t in [first, *waiting]:
        t.join(30)
    assert results == [200] * 4
    assert "leanlm_requests_total{outcome=\"http_429\"}" in httpx.get(f"{live['url']}/metrics").text
    assert idle(live)


def test_disconnect_frees_the_slot(live):
    served = live["served"]
    live["throttle"].delay = 0.02
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = served.scheduler.metrics.generated_tokens
    try:
        with httpx.stream("POST", f"{live['url']}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        started = time.monotonic()
        assert idle(live, timeout=2.0)  # 100 tokens would take >= 2 s: the slot was freed early
        assert time.monotonic() - started < 1.5
    finally:
        live["throttle"].delay = 0.0
    assert served.scheduler.metrics.generated_tokens - before < 60


def test_non_streaming_disconnect_frees_the_slot(live):
    live["throttle"].delay = 0.02
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{live['url']}/v1/completions", json=body, timeout=0.3)
        assert idle(live, timeout=1.5)
    finally:
        live["throttle"].delay = 0.0


MALFORMED = [  # (path, raw body or JSON, status)
    ("/v1/completions", b"not json", 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi"', 400),
    ("/v1/completions", [], 400),
    ("/v1/completions", {"prompt": "hi"}, 400),
    ("/v1/completions", {"model": "tiny"}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": 123}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -5}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2.5}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 5}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 2}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "yes"}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "frobnicate": 1}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * (MAX_LEN + 10)}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": [10**7]}, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/v1/nothing", {"model": "tiny"}, 404),
]


@pytest.mark.parametrize("path,body,status", MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_requests_get_4xx_and_server_keeps_serving(live, path, body, status):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{live['url']}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"].endswith(".") and "\n" not in error["message"]
    assert error["type"]
    ok = live["client"].completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_models_health_metrics(live):
    live["client"].completions.create(model="tiny", prompt=PROMPT, max_tokens=2)  # the slot cache allocates on first use
    assert [m.id for m in live["client"].models.list().data] == ["tiny"]
    assert httpx.get(f"{live['url']}/health").json() == {"status": "ok"}
    text = httpx.get(f"{live['url']}/metrics").text
    for name in ("leanlm_queue_depth", "leanlm_running_sequences", "leanlm_cache_bytes ",
                 "leanlm_generation_tokens_per_second", "leanlm_time_to_first_token_seconds_bucket",
                 "leanlm_time_per_output_token_seconds_count"):
        assert name in text
    held = int(next(line for line in text.splitlines() if line.startswith("leanlm_cache_bytes ")).split()[1])
    config = live["model"].config
    assert held == 2 * 2 * config.num_hidden_layers * 2 * MAX_LEN * 16 * 4  # slots x (K+V) x layers x kv x len x dim x fp32


def test_sigterm_shuts_down_cleanly(tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "leanlm.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--dtype", "float32", "--device", "cpu", "--max-len", "256", "--shutdown-timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://"), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split()[-1]
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": str(tiny_model_dir), "prompt": "Hello", "max_tokens": 5, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully (lifespan end: the scheduler stops), then re-raises the signal it
        # caught, so a supervisor sees "terminated by SIGTERM"; a crash would exit 1 with a traceback
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10
        err = proc.stderr.read()
        assert "leanlm serve: stopped; 0 request(s) in flight were cancelled" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_slot_cache_rows_at_their_own_positions_match_the_engine(family):
    """Two sequences in rows 2 and 0 of a slot cache, joining at different steps, one prefilled in
    chunks while the other decodes (gemma3: its sliding layers too) = each decoded alone."""
    from leanlm.engine import SlotCache, slot_forward
    from leanlm.models import tiny_model

    model = tiny_model(family)
    a, b = torch.randint(0, 256, (1, 13)), torch.randint(0, 256, (1, 20))
    want = {2: generate(model, a, 12)[0].tolist(), 0: generate(model, b, 12)[0].tolist()}
    cache = SlotCache(model.config, slots=4, max_len=64)
    got = {2: [], 0: []}
    with torch.inference_mode():
        got[2].append(int(slot_forward(model, cache, a, [2], [0])[0, -1].argmax()))
        for _ in range(3):
            got[2].append(int(slot_forward(model, cache, torch.tensor([[got[2][-1]]]), [2], [12 + len(got[2])])[0, -1]
                              .argmax()))
        for start in range(0, 20, 8):
            logits = slot_forward(model, cache, b[:, start: start + 8], [0], [start])
        got[0].append(int(logits[0, -1].argmax()))
        while min(len(t) for t in got.values()) < 12 or max(len(t) for t in got.values()) < 12:
            rows = [r for r in (0, 2) if len(got[r]) < 12]
            starts = [(20 if r == 0 else 13) + len(got[r]) - 1 for r in rows]
            ids = torch.tensor([[got[r][-1]] for r in rows])
            for r, token in zip(rows, slot_forward(model, cache, ids, rows, starts)[:, -1].argmax(-1).tolist()):
                got[r].append(token)
    assert got == want


def test_kv_policy_server_runs_sequences_at_batch_one_and_matches_the_engine(real_tokenizer, monkeypatch):
    from leanlm.kvcache import attach, make_policy

    monkeypatch.setenv("LEANLM_KV_COMPILE", "0")  # the fused kernel in eager torch: no minutes of compiling here
    model = tiny_for(real_tokenizer)
    policy = make_policy("quantized:group=16,residual=16", 0.25, MAX_LEN, model=model)
    ids = PROMPT
    with attach(model, policy) as cache:
        want = real_tokenizer.decode(generate(model, torch.tensor([ids]), 10, cache=cache)[0].tolist(),
                                     skip_special_tokens=True)
    served = build_served(model, real_tokenizer, "tiny-q", SchedulerConfig(max_batch=4, max_len=MAX_LEN), policy, 0.25)
    url, server, thread = start(served)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.completions.create(
            model="tiny-q", prompt=ids, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})))
            for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [r.choices[0].text for r in results] == [want, want]
        assert not served.scheduler.backend.live and served.scheduler.backend.reserved == 0
    finally:
        server.should_exit = True
        thread.join(10)


def test_sample_rows_gives_each_row_its_own_sampler():
    from leanlm.engine import Sampler, SamplingConfig, sample_rows

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    samplers = [Sampler(), Sampler(SamplingConfig(temperature=1.0, top_k=0, seed=3)),
                Sampler(SamplingConfig(temperature=0.7, top_p=0.9, seed=4))]
    got = sample_rows(samplers, logits).tolist()
    alone = [Sampler(SamplingConfig(temperature=1.0, top_k=0, seed=3)).sample(logits[1:2])[0],
             Sampler(SamplingConfig(temperature=0.7, top_p=0.9, seed=4)).sample(logits[2:3])[0]]
    assert got == [int(logits[0].argmax()), int(alone[0]), int(alone[1])]


def test_cache_byte_cap_sets_the_number_of_slots():
    from leanlm.errors import LeanLMError
    from leanlm.serve.backends import SlotBackend, bytes_per_token

    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    per_sequence = bytes_per_token(model.config, torch.float32) * 64
    assert per_sequence == 2 * 2 * 2 * 16 * 4 * 64  # (K+V) x layers x kv heads x head_dim x fp32 x tokens
    assert SlotBackend(model, 8, 64, max_cache_bytes=3 * per_sequence + 5).slots == 3
    assert SlotBackend(model, 2, 64, max_cache_bytes=10 * per_sequence).slots == 2
    with pytest.raises(LeanLMError, match="cannot hold one sequence"):
        SlotBackend(model, 8, 64, max_cache_bytes=per_sequence - 1)
