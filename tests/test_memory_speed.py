import psutil
import pytest
import torch

from leanlm.analyze.kv_budget import analytic_kv_bytes_per_token
from leanlm.evaluate import (
    SpeedConfig,
    measure_speed,
    measured_kv_bytes_per_token,
    param_count,
    peak_rss_mb,
    weight_bytes,
)
from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, tiny_llama


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_analytic_kv_bytes_equal_measured(kv_heads, dtype):
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=kv_heads, head_dim=16).to(dtype)
    spec = ModelSpec.from_model(model)
    size = torch.finfo(dtype).bits // 8
    hand = 2 * 3 * (kv_heads or 4) * 16 * size  # 2 (K and V) x layers x kv_heads x head_dim x bytes
    assert analytic_kv_bytes_per_token(spec, size) == hand
    assert measured_kv_bytes_per_token(model, num_tokens=10) == hand


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_the_llama_formula(tied):
    V, H, L, heads, kv, d, inter = 256, 64, 2, 4, 2, 16, 128
    model = tiny_llama(num_layers=L, hidden_size=H, num_heads=heads, num_kv_heads=kv, head_dim=d,
                       intermediate_size=inter, vocab_size=V, tie_word_embeddings=tied)
    per_layer = H * heads * d + 2 * H * kv * d + heads * d * H + 3 * H * inter + 2 * H
    expected = V * H + L * per_layer + H + (0 if tied else V * H)
    assert param_count(model) == expected
    assert weight_bytes(model) == 4 * expected
    assert weight_bytes(model.to(torch.bfloat16)) == 2 * expected


def test_peak_rss_sees_a_large_allocation():
    resident_now = psutil.Process().memory_info().rss / 2**20
    block = torch.ones(80 * 2**20)  # 320 MiB, written so it is resident
    assert block.sum() > 0
    assert peak_rss_mb() >= resident_now + 300


def test_speed_reports_every_setting(tiny_gqa):
    config = SpeedConfig(prefill_lengths=(16, 32), decode_batch_sizes=(1, 2), decode_prompt=8, decode_tokens=5,
                         warmup=0, repeats=2)
    result = measure_speed(tiny_gqa, config)
    assert set(result.prefill_tokens_per_s) == {"16", "32"} and set(result.decode_tokens_per_s) == {"1", "2"}
    assert all(v > 0 for v in result.prefill_tokens_per_s.values())
    for key in ("1", "2"):
        assert len(result.decode_latencies_ms[key]) == 2 * 5  # repeats x new tokens, warm-up excluded
        assert 0 < result.decode_latency_ms_p50[key] <= result.decode_latency_ms_p95[key]
    with pytest.raises(LeanLMError):
        SpeedConfig(repeats=0).validate()
