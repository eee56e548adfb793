"""Learned coarse tier for SentenceKV: one reconstructed K/V per sentence that is not fetched.

A sentence whose token K/V stay in the slow tier can still be seen, coarsely: from its summary
(mean key and mean value, both in fast memory) build one *pseudo-token*

    k̂_j = A_k · mean_k(j)          (A_k: a scaled rotation per RoPE pair, so k̂ follows RoPE exactly)
    v̂_j = s_v ⊙ mean_v(j) + b_v     (a scale and a shift per channel)
    logit bias  log n_j + β         (the pseudo-token stands for the sentence's n_j tokens)

per layer and KV head. With A_k = 1, s_v = 1, b_v = 0, β = 0 this is the *mean-only* baseline.
The maps are trained by distillation against the original cache (``fit``): for queries at
later positions, attention over sinks + the pseudo-tokens of the closed sentences must give the
same output as attention over sinks + those sentences' real tokens (relative squared error).
Training data come from WikiText-2 *validation* (``collect``); ``attention_errors`` measures the
same error on held-out text for: dropping the sentences (sinks only), mean-only, learned.

Why a scaled rotation for keys: the keys are post-RoPE, and a map that commutes with every RoPE
rotation gives the same k̂ whatever the sentence's absolute position. Per pair (x₁, x₂) that is
(a·x₁ − b·x₂, a·x₂ + b·x₁), i.e. ``a * x + b * rotate_half(x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from leanlm.errors import LeanLMError
from leanlm.kvcache.sentence.segment import segment
from leanlm.models.arch import arch_of
from leanlm.models.spec import ModelSpec
from leanlm.models.widen import widened_linears
from leanlm.models.arch import rotate_half


class CoarseMap(nn.Module):
    """One layer's maps from a sentence's mean key/value to its pseudo-token, per KV head."""

    def __init__(self, kv_heads: int, head_dim: int):
        super().__init__()
        self.key_cos = nn.Parameter(torch.ones(kv_heads, head_dim // 2))  # a: scale along each RoPE pair
        self.key_sin = nn.Parameter(torch.zeros(kv_heads, head_dim // 2))  # b: rotation within the pair
        self.value_scale = nn.Parameter(torch.ones(kv_heads, head_dim))  # per channel: few parameters, no overfit
        self.value_bias = nn.Parameter(torch.zeros(kv_heads, head_dim))
        self.logit_offset = nn.Parameter(torch.zeros(kv_heads))  # β, added to log n_j

    def keys(self, mean_keys: torch.Tensor) -> torch.Tensor:
        """(..., kv_heads, n, d) mean keys → pseudo keys, same shape and dtype."""
        a = torch.cat([self.key_cos, self.key_cos], dim=-1)[:, None]  # (kv, 1, d)
        b = torch.cat([self.key_sin, self.key_sin], dim=-1)[:, None]
        x = mean_keys.float()
        return (a * x + b * rotate_half(x)).to(mean_keys.dtype)

    def values(self, mean_values: torch.Tensor) -> torch.Tensor:
        """(..., kv_heads, n, d) mean values → pseudo values."""
        x = mean_values.float()
        return (self.value_scale[:, None] * x + self.value_bias[:, None]).to(mean_values.dtype)

    def logit_bias(self, lengths: torch.Tensor) -> torch.Tensor:
        """(n,) sentence lengths → (kv_heads, n) additive attention-logit bias."""
        return lengths.float().log()[None] + self.logit_offset[:, None]


class CoarseMaps(nn.Module):
    """The maps of every layer; saved as one safetensors file."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.shape = (layers, kv_heads, head_dim)
        self.layers = nn.ModuleList(CoarseMap(kv_heads, head_dim) for _ in range(layers))

    @classmethod
    def identity(cls, model: nn.Module) -> CoarseMaps:
        """The mean-only maps for ``model`` (pseudo-token = mean key, mean value, bias log n)."""
        spec = ModelSpec.from_config(model.config)  # uniform models only (the coarse tier refuses others)
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim)

    def save(self, path: str | Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"layers": str(self.shape[0]), "kv_heads": str(self.shape[1]), "head_dim": str(self.shape[2])})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> CoarseMaps:
        path = Path(path)
        if not path.is_file():
            raise LeanLMError(f"reconstruction maps '{path}' not found (train them: benchmarks/sentence_reconstruction.py)")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        maps = cls(int(meta["layers"]), int(meta["kv_heads"]), int(meta["head_dim"]))
        maps.load_state_dict(load_file(str(path)))
        if model is not None and maps.shape != cls.identity(model).shape:
            raise LeanLMError(f"reconstruction maps '{path}' are for (layers, kv_heads, head_dim) {maps.shape}, "
                              f"the model has {cls.identity(model).shape}")
        return maps.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Training data: queries, keys, values and sentences of real windows
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerSample:
    """One window, one layer: what a coarse tier must reproduce."""

    queries: torch.Tensor  # (heads, P, d) post-RoPE queries at the sampled positions
    keys: torch.Tensor  # (kv_heads, T, d) post-RoPE
    values: torch.Tensor  # (kv_heads, T, d)
    sentence: torch.Tensor  # (T,) sentence id of each token, -1 for the sinks
    positions: torch.Tensor  # (P,) the sampled query positions


def window_sentences(ids: torch.Tensor, is_boundary: torch.Tensor | None, max_sentence: int, sink: int) -> torch.Tensor:
    """(T,) sentence ids of one window as SentenceTier segments it (-1 for the sinks)."""
    rest, _ = segment(ids[sink:], is_boundary, max_sentence)
    return torch.tensor([-1] * min(sink, len(ids)) + rest)


@torch.no_grad()
def collect(model, windows: list[torch.Tensor], is_boundary, max_sentence: int, sink: int, queries: int = 64,
            seed: int = 0) -> list[list[LayerSample]]:
    """Per window, per layer: ``queries`` random query positions from the window's second half."""
    gen = torch.Generator().manual_seed(seed)
    captured: dict[int, torch.Tensor] = {}

    def grab(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        view = arch_of(model).attention(module.layer_idx)
        q = view.scoring_queries(hidden, (cos, sin))  # (batch, heads, seq, head_dim), scaled for 1/sqrt(d)
        k, v = view.rotated_keys_values(hidden, (cos, sin))  # (batch, kv_heads, seq, head_dim)
        captured[module.layer_idx] = (q[0], k[0], v[0])

    layers = arch_of(model).attentions()
    handles = [view.module.register_forward_pre_hook(grab, with_kwargs=True) for view in layers]
    samples = []
    try:
        with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones (one swap for all windows)
            for ids in tqdm(windows, desc="collect K/V", unit="win", leave=False):
                captured.clear()
                model(ids[None], use_cache=False)
                T = len(ids)
                positions = torch.randperm(T - T // 2, generator=gen)[:queries].sort().values + T // 2
                sentence = window_sentences(ids, is_boundary, max_sentence, sink)
                samples.append([LayerSample(captured[i][0][:, positions].float(), captured[i][1].float(),
                                            captured[i][2].float(), sentence, positions) for i in range(len(layers))])
    finally:
        for handle in handles:
            handle.remove()
    return samples


# ---------------------------------------------------------------------------------------------
# The objective: attention over sinks + closed sentences, real tokens vs pseudo-tokens
# ---------------------------------------------------------------------------------------------


def sentence_means(sample: LayerSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean key, mean value (kv_heads, S, d) and length (S,) of every sentence of the window."""
    ids = sample.sentence
    count = int(ids.max()) + 1
    onehot = torch.zeros(count, len(ids))
    onehot[ids[ids >= 0], (ids >= 0).nonzero().squeeze(1)] = 1.0
    lengths = onehot.sum(dim=1)
    weights = onehot / lengths.clamp(min=1)[:, None]
    return weights @ sample.keys, weights @ sample.values, lengths


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """queries (H, P, d), keys/values (kv, N, d), visible (P, N) bool, bias (kv, N) → (H, P, d)."""
    group = queries.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    logits = queries @ keys.transpose(1, 2) / math.sqrt(queries.shape[-1])
    if bias is not None:
        logits = logits + bias.repeat_interleave(group, 0)[:, None]
    logits = logits.masked_fill(~visible[None], float("-inf"))
    return torch.softmax(logits, dim=-1) @ values


def closed_before(sample: LayerSample, count: int) -> torch.Tensor:
    """(P, S): sentence j is closed before the sentence of query position p (p's own is open)."""
    own = sample.sentence[sample.positions]  # (P,)
    return torch.arange(count)[None] < own[:, None]


def coarse_outputs(sample: LayerSample, layer_map: CoarseMap | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, approx) attention outputs (H, P, d); layer_map None: drop the sentences (sinks only)."""
    mean_k, mean_v, lengths = sentence_means(sample)
    closed = closed_before(sample, len(lengths))  # (P, S)
    sink = sample.sentence < 0
    token_closed = closed[:, sample.sentence.clamp(min=0)] & ~sink  # (P, T)
    target = attend(sample.queries, sample.keys, sample.values, token_closed | sink)
    sink_k, sink_v = sample.keys[:, sink], sample.values[:, sink]
    sink_visible = torch.ones(len(sample.positions), int(sink.sum()), dtype=torch.bool)
    if layer_map is None:
        return target, attend(sample.queries, sink_k, sink_v, sink_visible)
    keys = torch.cat([sink_k, layer_map.keys(mean_k)], dim=1)
    values = torch.cat([sink_v, layer_map.values(mean_v)], dim=1)
    bias = torch.cat([torch.zeros(keys.shape[0], sink_k.shape[1]), layer_map.logit_bias(lengths.clamp(min=1))], dim=1)
    return target, attend(sample.queries, keys, values, torch.cat([sink_visible, closed], dim=1), bias)


def relative_error(pairs) -> float:
    """Σ‖approx − target‖² / Σ‖target‖² over (target, approx) pairs."""
    num = den = 0.0
    for target, approx in pairs:
        num, den = num + (approx - target).pow(2).sum(), den + target.pow(2).sum()
    return num / den


def fit(maps: CoarseMaps, samples: list[list[LayerSample]], steps: int = 150, lr: float = 0.01) -> list[float]:
    """Train each layer's map on ``samples`` (Adam, full batch); returns the final loss per layer."""
    if steps < 1:
        raise LeanLMError(f"fit needs at least one step, got {steps}")
    losses = []
    for i, layer_map in enumerate(tqdm(maps.layers, desc="fit coarse maps", unit="layer", leave=False)):
        layer_map.requires_grad_(True)
        optimizer = torch.optim.Adam(layer_map.parameters(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = relative_error(coarse_outputs(window[i], layer_map) for window in samples)
            loss.backward()
            optimizer.step()
        layer_map.requires_grad_(False)
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def attention_errors(maps: CoarseMaps, samples: list[list[LayerSample]]) -> dict[str, list[float]]:
    """Per layer, the relative attention-output error of: drop, mean-only, these maps."""
    identity = CoarseMaps(*maps.shape)
    errors = {"drop": [], "mean": [], "learned": []}
    for i in range(maps.shape[0]):
        errors["drop"].append(float(relative_error(coarse_outputs(w[i], None) for w in samples)))
        errors["mean"].append(float(relative_error(coarse_outputs(w[i], identity.layers[i]) for w in samples)))
        errors["learned"].append(float(relative_error(coarse_outputs(w[i], maps.layers[i]) for w in samples)))
    return errors


__all__ = ["CoarseMap", "CoarseMaps", "LayerSample", "attention_errors", "collect", "coarse_outputs", "fit",
           "window_sentences"]
