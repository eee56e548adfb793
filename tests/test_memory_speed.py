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
from leanlm.evaluate.speed import percentile
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
    assert block.sum() == 80 * 2**20  # every element written and read back
    assert peak_rss_mb() >= resident_now + 300


def test_speed_reports_every_setting(tiny_gqa):
    config = SpeedConfig(prefill_lengths=(16, 32), decode_batch_sizes=(1, 2), decode_prompt=8, decode_tokens=5,
                         warmup=0, repeats=2)
    result = measure_speed(tiny_gqa, config)
    assert set(result.prefill_tokens_per_s) == {"16", "32"} and set(result.decode_tokens_per_s) == {"1", "2"}
    for key, batch in (("1", 1), ("2", 2)):
        steps = result.decode_latencies_ms[key]
        assert len(steps) == 2 * 5  # repeats x new tokens, warm-up excluded
        # nearest-rank percentiles of the 10 recorded steps: p50 is the 5th smallest (index round(4.5) = 4), p95 the largest
        assert result.decode_latency_ms_p50[key] == sorted(steps)[4] and result.decode_latency_ms_p95[key] == max(steps)
        per_run = [batch * 5 / (sum(steps[i:i + 5]) / 1000) for i in (0, 5)]  # tokens / seconds of each repeat
        assert result.decode_tokens_per_s[key] == pytest.approx(sum(per_run) / 2)  # the median of two


def test_percentile_is_the_nearest_rank_of_a_hand_sorted_list():
    values = [7.0, 1.0, 9.0, 3.0, 5.0, 2.0, 8.0, 4.0, 6.0, 10.0, 11.0]  # 1..11 shuffled
    assert [percentile(values, q) for q in (0, 10, 50, 95, 100)] == [1.0, 2.0, 6.0, 11.0, 11.0]
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 3.0  # index round(1.5) = 2 of [1, 2, 3, 4]


class FakeClock:
    """A synchronised clock advancing a fixed 0.25 s per read: every timed span is exactly 0.25 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self, device=None) -> float:
        self.now += 0.25
        return self.now


def test_speed_numbers_follow_from_the_clock(tiny_gqa, monkeypatch):
    from leanlm.evaluate import speed

    monkeypatch.setattr(speed, "synced_clock", FakeClock())
    config = SpeedConfig(prefill_lengths=(16, 32), decode_batch_sizes=(1, 2), decode_prompt=8, decode_tokens=5,
                         warmup=0, repeats=3)
    result = measure_speed(tiny_gqa, config)
    assert result.prefill_tokens_per_s == {"16": 16 / 0.25, "32": 32 / 0.25}
    assert result.decode_tokens_per_s == {"1": 1 / 0.25, "2": 2 / 0.25}  # batch tokens per 0.25 s step
    assert result.decode_latency_ms_p50 == result.decode_latency_ms_p95 == {"1": 250.0, "2": 250.0}
    with pytest.raises(LeanLMError):
        SpeedConfig(repeats=0).validate()


def test_alternate_runs_the_candidates_in_turn_and_median_ratio_compares_medians():
    from leanlm.evaluate.side_by_side import alternate, median_ratio

    order = []
    runs = alternate({"a": lambda: order.append("a") or len(order), "b": lambda: order.append("b") or len(order)}, 3)
    assert order == ["a", "b"] * 3 and runs == {"a": [1, 3, 5], "b": [2, 4, 6]}
    assert median_ratio([10.0, 30.0, 20.0], [5.0, 100.0, 10.0]) == {"base": 20.0, "candidate": 10.0, "ratio": 0.5}
    with pytest.raises(ValueError):
        alternate({"a": lambda: 1}, 0)
