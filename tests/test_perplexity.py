import math

import pytest
import torch

from leanlm.data import nonoverlapping_windows, sliding_windows
from leanlm.errors import LeanLMError
from leanlm.evaluate import PerplexityProtocol, perplexity, token_nll
from leanlm.models import tiny_llama


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = tiny_llama(vocab_size=256)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0 -> uniform next-token distribution
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    total, count, _ = token_nll(model, ids, sliding_windows(len(ids), 64, 32))
    assert count == 299
    assert math.exp(total / count) == pytest.approx(256, rel=1e-5)


def test_one_window_equals_transformers_own_loss(tiny_gqa):
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(2))
    total, count, _ = token_nll(tiny_gqa, ids, sliding_windows(len(ids), 64, 32))
    with torch.no_grad():
        reference = tiny_gqa(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()
    assert count == 49 and total / count == pytest.approx(reference, rel=1e-5)


def test_sliding_context_changes_scores_but_not_counts(tiny_gqa):
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3))
    short, n_short, _ = token_nll(tiny_gqa, ids, sliding_windows(200, 32, 31))
    overlapped, n_over, _ = token_nll(tiny_gqa, ids, sliding_windows(200, 32, 8))
    assert n_short == n_over == 199
    assert short != pytest.approx(overlapped, rel=1e-6)  # more context -> different loss


def test_nonoverlap_scores_each_window_fully(tiny_mha):
    ids = torch.randint(0, 256, (130,), generator=torch.Generator().manual_seed(4))
    total, count, per_window = token_nll(tiny_mha, ids, nonoverlapping_windows(130, 64))
    with torch.no_grad():
        first = tiny_mha(ids[:64].unsqueeze(0), labels=ids[:64].unsqueeze(0)).loss.item()
    assert count == 126 and per_window[0] == pytest.approx(first, rel=1e-5)


@pytest.mark.parametrize(
    "protocol",
    [
        PerplexityProtocol(method="nearest"),
        PerplexityProtocol(split="train"),
        PerplexityProtocol(window=1),
        PerplexityProtocol(window=128, stride=256),
        PerplexityProtocol(max_tokens=1),
    ],
)
def test_bad_protocols_are_clear_errors(protocol):
    with pytest.raises(LeanLMError):
        protocol.validate()


@pytest.mark.real_model
def test_real_model_bf16_agrees_with_fp32_within_one_percent(real_tokenizer, real_model_bf16):
    from leanlm.models import load_model

    protocol = PerplexityProtocol(method="nonoverlap", window=512, max_tokens=2048)
    bf16 = perplexity(real_model_bf16, real_tokenizer, protocol)
    fp32 = perplexity(load_model("smollm2-135m", dtype="float32"), real_tokenizer, protocol)
    assert bf16.protocol["dtype"] == "bfloat16" and fp32.protocol["dtype"] == "float32"
    assert bf16.tokens_scored == fp32.tokens_scored == 4 * 511
    assert 5 < fp32.perplexity < 60  # a working 135M model on WikiText, not a broken one
    assert abs(bf16.perplexity / fp32.perplexity - 1) < 0.01


@pytest.mark.real_model
def test_real_model_sliding_protocol_is_recorded(real_tokenizer, real_model_bf16):
    result = perplexity(real_model_bf16, real_tokenizer, PerplexityProtocol(window=256, stride=128, max_tokens=1024))
    assert result.protocol | {} == result.protocol
    for key in ("split", "method", "window", "stride", "max_tokens", "dtype", "tokens_scored"):
        assert key in result.protocol
    assert result.tokens_scored == 1023 and result.protocol["split"] == "test"
    assert 5 < result.perplexity < 80
