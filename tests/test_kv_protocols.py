import json
import math

import psutil
import pytest
import torch
from transformers import DynamicCache

from leanlm.data import nonoverlapping_windows
from leanlm.errors import LeanLMError
from leanlm.evaluate import kv as kp
from leanlm.evaluate.kv import continuation, passkey, streaming
from leanlm.evaluate import token_nll
from leanlm.kvcache import SinkWindow, attach, make_policy
from leanlm.models import tiny_llama

VOCAB = 256


class ByteTokenizer:
    """Bytes as tokens: matches tiny_llama's 256-token vocabulary, no files needed."""

    def __call__(self, text, add_special_tokens=False, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [list(t.encode()) for t in text]}
        return {"input_ids": list(text.encode())}

    def decode(self, ids, **kwargs):
        return bytes(ids).decode(errors="replace")


FILLER = "".join(
    f"Sentence {i} tells of the river, the hills and the town of number {i * 7}. " + ("\n" if i % 5 == 4 else "")
    for i in range(400)
)


@pytest.fixture
def stream(monkeypatch):
    """A synthetic token stream in place of the tokenized WikiText split."""
    ids = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(0))
    for module in (streaming, continuation):
        monkeypatch.setattr(module, "tokenize_split", lambda tokenizer, split, join="raw": ids)
    return ids


@pytest.fixture
def filler(monkeypatch):
    monkeypatch.setattr(passkey, "wikitext_text", lambda split, join="raw": FILLER)


@pytest.fixture
def model():
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)


# -- streaming ------------------------------------------------------------------------------


SMALL_STREAM = kp.StreamingProtocol(context=64, chunk=8, max_tokens=192)


@pytest.mark.parametrize("name", ["sink_window", "heavy_hitter", "observation_window"])
def test_full_budget_streaming_equals_uncompressed(model, stream, name):
    base = kp.streaming_perplexity(model, None, None, SMALL_STREAM)
    full = kp.streaming_perplexity(model, None, make_policy(name, 1.0, 64), SMALL_STREAM, reference=True)
    assert full.tokens_scored == base.tokens_scored == 3 * 63
    assert full.perplexity == base.perplexity  # bit for bit: nothing was evicted
    assert full.reference_perplexity == base.perplexity
    assert abs(full.kl) < 1e-9 and full.top1_agreement == 1.0


def test_small_budget_has_positive_kl_and_fewer_bytes(model, stream):
    reference = kp.streaming_reference(model, None, SMALL_STREAM)
    small = kp.streaming_perplexity(model, None, make_policy("sink_window", 0.25, 64), SMALL_STREAM, reference=reference)
    on_the_fly = kp.streaming_perplexity(model, None, make_policy("sink_window", 0.25, 64), SMALL_STREAM, reference=True)
    assert small.kl > 1e-3 and small.top1_agreement < 1
    assert small.kl == pytest.approx(on_the_fly.kl, rel=1e-6)  # a stored reference = running it alongside
    # Uncompressed float32 cache: 2 (K, V) x layers x kv_heads x head_dim x 4 bytes per token.
    assert reference.result.bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert small.bytes_per_token == pytest.approx(0.25 * reference.result.bytes_per_token)
    assert small.reference_bytes_per_token == reference.result.bytes_per_token
    assert reference.nbytes() == 3 * 63 * 64 * 4  # hidden states, not vocab-sized log-probs


def test_uniform_model_streaming_perplexity_is_vocab_size(model, stream):
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: uniform next-token distribution
    result = kp.streaming_perplexity(model, None, make_policy("sink_window", 0.25, 64), SMALL_STREAM, reference=True)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-5)
    assert abs(result.kl) < 1e-9


def test_streaming_in_one_chunk_matches_the_nonoverlap_perplexity(model, stream):
    protocol = kp.StreamingProtocol(context=64, chunk=64, max_tokens=192)
    result = kp.streaming_perplexity(model, None, None, protocol)
    total, count, _ = token_nll(model, stream[:192], nonoverlapping_windows(192, 64))
    assert result.tokens_scored == count
    assert result.mean_nll == pytest.approx(total / count, rel=1e-5)
    # Token-by-token streaming computes the same thing, up to float round-off.
    exact = kp.streaming_perplexity(model, None, None, kp.StreamingProtocol(context=64, chunk=1, max_tokens=192))
    assert exact.mean_nll == pytest.approx(result.mean_nll, rel=1e-4)


def test_reference_for_another_protocol_is_refused(model, stream):
    reference = kp.streaming_reference(model, None, SMALL_STREAM)
    other = kp.StreamingProtocol(context=64, chunk=4, max_tokens=192)
    with pytest.raises(LeanLMError, match="another protocol"):
        kp.streaming_perplexity(model, None, make_policy("sink_window", 0.5, 64), other, reference=reference)
    with pytest.raises(LeanLMError, match="output head"):
        kp.streaming_perplexity(tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, seed=5), None, None, SMALL_STREAM,
                                reference=reference)


def test_results_serialise(model, stream):
    result = kp.streaming_perplexity(model, None, make_policy("heavy_hitter+int8", 0.5, 64, model=model, group=16), SMALL_STREAM)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["protocol"]["name"] == "streaming" and data["protocol"]["chunk"] == 8
    assert data["policy"]["policy"] == "heavy_hitter" and data["kl"] is None


# -- continuation -----------------------------------------------------------------------------


SMALL_CONT = kp.ContinuationProtocol(context=80, continuation=16, windows=3)


def test_continuation_windows_are_back_to_back_slices(stream):
    windows = kp.continuation_windows(None, SMALL_CONT)
    assert windows == [stream[i * 96 : (i + 1) * 96].tolist() for i in range(3)]
    with pytest.raises(LeanLMError, match="fewer than"):
        kp.continuation_windows(None, kp.ContinuationProtocol(context=200, continuation=16, windows=2))


@pytest.mark.parametrize("name", ["sink_window", "heavy_hitter", "observation_window", "quantized"])
def test_full_budget_continuation_equals_uncompressed(model, stream, name):
    reference = kp.continuation_reference(model, None, SMALL_CONT)
    full = kp.continuation_perplexity(model, None, make_policy(name, 1.0, 80), SMALL_CONT, reference=reference)
    assert full.tokens_scored == reference.result.tokens_scored == 3 * 16
    assert full.mean_nll == pytest.approx(reference.result.mean_nll, abs=1e-6)
    assert abs(full.kl) < 1e-6


def test_continuation_nll_matches_one_full_forward(model, stream):
    result = kp.continuation_perplexity(model, None, None, SMALL_CONT)
    window = torch.tensor(kp.continuation_windows(None, SMALL_CONT)[0])
    with torch.no_grad():
        logits = model(window.unsqueeze(0)).logits[0, 79:-1]  # predictions of tokens 80..95
    nll = torch.nn.functional.cross_entropy(logits, window[80:]).item()
    assert result.window_nll[0] == pytest.approx(nll, rel=1e-5)


def test_continuation_bytes_are_measured_after_the_prefill(model, stream):
    small = kp.continuation_perplexity(model, None, make_policy("heavy_hitter", 0.25, 80, model=model), SMALL_CONT, reference=True)
    assert small.reference_bytes_per_token == 2 * 2 * 2 * 16 * 4  # the whole context, uncompressed
    # 18 tokens kept: floor(20 x 2 x 16 x 2 / (2 x 16 x 2 + 4)), the model's head_dim 16 with H2O's 4-byte
    # score per token and KV head, sized for a 2-byte cache (this fp32 model could hold 19), plus the float32
    # scores: one per kept token and KV head, per layer. All of it within the budget.
    assert small.bytes_per_token == pytest.approx((18 * 2 * 2 * 16 * 4 + 18 * 2 * 4) * 2 / 80)
    assert small.bytes_per_token <= 0.25 * small.reference_bytes_per_token
    assert small.kl > 1e-3


# -- passkey ----------------------------------------------------------------------------------


def test_passkey_prompts_have_the_length_and_the_key_at_the_depth(filler):
    tokenizer = ByteTokenizer()
    protocol = kp.PasskeyProtocol(lengths=(1024, 2048), depths=(0.1, 0.5, 0.9), seed=3)
    items = kp.passkey_prompts(tokenizer, protocol)
    assert [(it.length, it.depth) for it in items] == [(n, d) for n in (1024, 2048) for d in (0.1, 0.5, 0.9)]
    intro = len(kp.PASSKEY_INTRO.encode())
    for item in items:
        text = tokenizer.decode(item.ids)
        assert len(item.ids) == item.length
        assert text.endswith(kp.PASSKEY_QUESTION)
        sentence = kp.PASSKEY_SENTENCE.format(key=item.passkey)
        assert text.index(sentence) == item.key_start and text.count(item.passkey) == 2
        assert len(item.passkey) == 5 and tokenizer.decode(item.answer_ids) == " " + item.passkey
        filler_tokens = item.length - intro - len(sentence) - len(kp.PASSKEY_QUESTION)
        assert abs((item.key_start - intro) / filler_tokens - item.depth) < 0.06  # a sentence boundary nearby
        assert text[item.key_start - 1] in ". \n"  # inserted after a sentence end
    again = kp.passkey_prompts(tokenizer, protocol)
    assert [it.ids for it in again] == [it.ids for it in items]
    other = kp.passkey_prompts(tokenizer, kp.PasskeyProtocol(lengths=(1024, 2048), seed=4))
    assert [it.passkey for it in other] != [it.passkey for it in items]
    assert len({it.passkey for it in items}) == len(items)


def test_passkey_filler_comes_from_the_split_asked(monkeypatch):
    texts = {"test": FILLER, "validation": FILLER.upper()}
    asked = []
    monkeypatch.setattr(passkey, "wikitext_text", lambda split, join="raw": asked.append(split) or texts[split])
    protocol = kp.PasskeyProtocol(lengths=(512,), depths=(0.5,))
    test_item = kp.passkey_prompts(ByteTokenizer(), protocol)[0]
    validation_item = kp.passkey_prompts(ByteTokenizer(), kp.PasskeyProtocol(lengths=(512,), depths=(0.5,),
                                                                             filler_split="validation"))[0]
    assert asked == ["test", "validation"]
    assert len(validation_item.ids) == len(test_item.ids) and validation_item.ids != test_item.ids
    assert validation_item.passkey == test_item.passkey  # same seed: only the filler differs


def test_passkey_prompt_too_short_is_a_clear_error(filler):
    with pytest.raises(LeanLMError, match="no room for filler"):
        kp.passkey_prompts(ByteTokenizer(), kp.PasskeyProtocol(lengths=(100,)))


def _greedy(model, ids, policy, steps):
    """An actual greedy decode through transformers' generate (one-forward prefill)."""
    ids = torch.tensor([ids])
    kwargs = dict(max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if policy is None:
            out = model.generate(ids, past_key_values=DynamicCache(), **kwargs)
        else:
            with attach(model, policy) as cache:
                out = model.generate(ids, past_key_values=cache, **kwargs)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    loglik = sum(torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens))
    return tokens, loglik


@pytest.mark.parametrize("policy", [None, SinkWindow(sink=4, window=150), make_policy("heavy_hitter", 0.5, 300, head_dim=16),
                                    make_policy("quantized", 0.25, 300, group=16, residual=16)],
                         ids=["none", "sink_window", "heavy_hitter", "quantized"])
def test_teacher_forced_exact_match_equals_greedy_decode(filler, policy):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, seed=1)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # decode all 6 tokens whatever comes out
    tokenizer = ByteTokenizer()
    item = kp.passkey_prompts(tokenizer, kp.PasskeyProtocol(lengths=(300,), depths=(0.5,)))[0]
    greedy, greedy_loglik = _greedy(model, item.ids, policy, 6)
    assert len(greedy) == 6
    wrong_late = greedy[:4] + [(greedy[4] + 1) % VOCAB] + greedy[5:]
    items = [kp.PasskeyItem(item.ids, answer, 300, 0.5, "x", item.key_start)
             for answer in (greedy, wrong_late, [(greedy[0] + 1) % VOCAB] + greedy[1:])]
    protocol = kp.PasskeyProtocol(prefill_chunk=512)  # one-forward prefill, as generate does
    result = kp.passkey_eval(model, tokenizer, policy, items, protocol)
    assert [d["correct"] for d in result.items] == [True, False, False]
    assert result.items[0]["predicted"] == tokenizer.decode(greedy)
    assert result.accuracy == {"300": pytest.approx(1 / 3)}
    assert result.items[0]["loglik"] == pytest.approx(greedy_loglik, abs=1e-4)


def test_passkey_eval_with_a_factory_and_normalise(filler):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    tokenizer = ByteTokenizer()
    protocol = kp.PasskeyProtocol(lengths=(300, 400), depths=(0.2, 0.8), prefill_chunk=128)
    items = kp.passkey_prompts(tokenizer, protocol)
    base = kp.passkey_eval(model, tokenizer, None, items, protocol)
    sized = []
    small = kp.passkey_eval(model, tokenizer, lambda n: sized.append(n) or make_policy("sink_window", 0.25, n),
                            items, protocol)
    assert sized == [300, 300, 400, 400]
    assert small.policy["400"]["window"] == 96 and all(d["held_tokens"] <= 100 for d in small.items)
    assert base.items[0]["held_tokens"] == 300
    norm = kp.normalise(small, base)
    assert set(norm["accuracy"]) == set(norm["answer_loglik"]) == {"300", "400"}
    for length in ("300", "400"):
        assert norm["answer_loglik"][length] == pytest.approx(small.answer_loglik[length] - base.answer_loglik[length])
        expected = None if base.accuracy[length] == 0 else small.accuracy[length] / base.accuracy[length]
        assert norm["accuracy"][length] == expected
    fake = {"accuracy": {"300": 0.5, "400": 0.0}, "answer_loglik": {"300": -3.0, "400": -4.0}}
    base_fake = {"accuracy": {"300": 1.0, "400": 0.0}, "answer_loglik": {"300": -2.0, "400": -5.0}}
    assert kp.normalise(fake, base_fake) == {"accuracy": {"300": 0.5, "400": None},
                                             "answer_loglik": {"300": -1.0, "400": 1.0}}
    with pytest.raises(LeanLMError, match="no passkey result"):
        kp.normalise(fake, {"accuracy": {"300": 1.0}, "answer_loglik": {"300": -2.0}})


# -- long generation --------------------------------------------------------------------------


def test_long_generation_sink_window_stays_flat_while_dynamic_grows(model, tmp_path):
    tokenizer = ByteTokenizer()
    protocol = kp.LongGenerationProtocol(new_tokens=100, sample_every=20, prompt="Once upon a time", seed=0)
    window = kp.long_generation(model, tokenizer, SinkWindow(sink=4, window=28, position_mode="cache"), protocol)
    full = kp.long_generation(model, tokenizer, None, protocol)
    assert window.steps == full.steps == list(range(20, 101, 20))
    assert window.held_tokens == [32] * 5  # 16 prompt + 20 tokens already fill the 32 slots
    assert len(set(window.cache_bytes)) == 1
    assert full.held_tokens == [16 + s for s in full.steps]
    assert full.cache_bytes == [(16 + s) * 2 * 2 * 2 * 16 * 4 for s in full.steps]
    assert window.tokens_per_s == pytest.approx(100 / window.seconds[-1])  # generated tokens / decode seconds
    assert window.seconds == sorted(window.seconds) and len(set(window.seconds)) == 5  # sampled as time went on
    assert abs(window.rss_mib[-1] - psutil.Process().memory_info().rss / 2**20) < 256  # this process's RSS, MiB
    assert window.total_bytes == window.cache_bytes  # one tier: nothing beside the cache
    again = kp.long_generation(model, tokenizer, None, protocol)
    assert again.text_tail == full.text_tail  # seeded sampling is reproducible
    path = tmp_path / "long.png"
    kp.plot_long_generation(window, path)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    "protocol",
    [
        kp.StreamingProtocol(context=1),
        kp.StreamingProtocol(context=64, chunk=65),
        kp.StreamingProtocol(context=64, max_tokens=32),
        kp.StreamingProtocol(split="train"),
        kp.StreamingProtocol(join="lines"),
        kp.ContinuationProtocol(continuation=0),
        kp.PasskeyProtocol(depths=(1.5,)),
        kp.PasskeyProtocol(prefill_chunk=0),
        kp.LongGenerationProtocol(sample_every=0),
        kp.LongGenerationProtocol(temperature=-1),
    ],
)
def test_bad_protocols_are_clear_errors(protocol):
    with pytest.raises(LeanLMError):
        protocol.validate()


def test_a_factory_must_build_a_policy():
    with pytest.raises(LeanLMError, match="CachePolicy"):
        kp.resolve_policy(lambda n: "sink_window", 64)


# -- the real model (slow) --------------------------------------------------------------------


@pytest.mark.real_model
def test_real_passkey_prompt_and_short_runs(real_model_bf16, real_tokenizer):
    items = kp.passkey_prompts(real_tokenizer, kp.PasskeyProtocol(lengths=(256,), depths=(0.5,)))
    assert len(items[0].ids) == 256
    assert real_tokenizer.decode(items[0].answer_ids).strip() == items[0].passkey
    protocol = kp.StreamingProtocol(context=128, chunk=32, max_tokens=256)
    full = kp.streaming_perplexity(real_model_bf16, real_tokenizer, None, protocol)
    small = kp.streaming_perplexity(real_model_bf16, real_tokenizer, make_policy("sink_window", 0.5, 128), protocol,
                                    reference=True)
    assert 5 < full.perplexity < 200 and not math.isnan(small.kl)
    assert small.reference_perplexity == full.perplexity and small.kl > 0
