"""A Llama-family decode step written out: one token per sequence through a static cache (or, for
speculative verification, a chain of tokens of one sequence: ``LeanStep.chain``).

transformers' layer code spends most of a bf16 decode step on the CPU outside the matmuls (at batch 1
on SmolLM2-135M, ~20 ms of a ~33 ms step once the matmuls run through leanlm's kernel): masks over
every slot of the cache, dtype casts, per-call argument handling, and PyTorch's CPU attention, built
for many queries, over one. ``decode_layers`` runs the same arithmetic with the model's own modules:

    x = x + o_proj(attend(rope(q_proj(norm(x))), cache[: slot + 1]))    per layer, then
    x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))

writing the new K/V into the very ``StaticCache`` tensors that prefill (the stock forward) filled, so
the cache stays transformers' and either path can continue from it. Attention reads only the slots
written so far (``leanlm::decode_attention``: grouped K/V heads, no repeat), pads of a left-padded
batch are masked. It is a plain function of tensors, so ``compile=True`` compiles it whole (the
kernels are opaque ops in the graph).

Only what it reproduces is accepted (``unsupported_reason``): Llama, Mistral and Qwen2 layers of the
stock classes, SiLU MLPs, full attention, no hooks (projections are called as modules, so int8/int4
or LoRA-wrapped linears work). A policy cache whose layers attend over their own storage
(``lean_attend``: the ``quantized`` cache reads its codes in ``leanlm::quantized_decode_attention``)
takes the same step, eagerly. Sliding-window layers of a swapped model (``transforms/swap_attention``)
write into and attend over their ring of sink + window slots (``ring_write``), compiled or not, so
their cost per step stays flat in the context. Anything else (Gemma 3, linear or latent attention, other policy
caches, a DynamicCache) decodes through the model's own forward.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.engine import kernels
from leanlm.engine.compile import inductor_options
from leanlm.engine.static_cache import capacity, is_static, window_layers
from leanlm.errors import LeanLMError
from leanlm.switch import Switch

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")
LAYER_CLASSES = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
WINDOW_CLASSES = {"SlidingWindowAttention"}  # a swapped layer (transforms/swap_attention): a ring of sink + window slots
MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``LeanStep`` cannot run ``model`` (None: it can)."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type!r} is not one of {FAMILIES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    layer_types = getattr(config, "layer_types", None) or []
    windowed = getattr(config, "use_sliding_window", False) or (config.model_type == "mistral" and config.sliding_window)
    if windowed or any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.model.layers / rotary_emb"
    for layer in inner.layers:
        kinds = (type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__,
                 type(layer.input_layernorm).__name__, type(layer.post_attention_layernorm).__name__)
        if (kinds[0] not in LAYER_CLASSES or kinds[1] not in ATTENTION_CLASSES | WINDOW_CLASSES or kinds[2] not in MLP_CLASSES
                or not set(kinds[3:]) <= NORM_CLASSES):
            return f"layer classes {kinds}"
    for module in (inner, *inner.modules()):
        if module._forward_hooks or module._forward_pre_hooks:
            return f"forward hooks on {type(module).__name__}"
    return None


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm (float32 statistics, weight times the input-dtype result) in fewer ops."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, heads, head_dim) with (batch, 1, head_dim) cos/sin (rotate-half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, keep, scale: float):
    """(batch, heads, dim) attention of one query per head over the first ``length`` (a 1-element
    tensor, or one per row) cache slots; ``keep`` (batch, >= length) marks real tokens; a cache of batch 1
    serves every row (a chain). leanlm's kernel where it runs, else PyTorch's SDPA over all slots with the
    unwritten ones masked."""
    if (q.device.type == "cpu" and keys.dtype in (torch.bfloat16, torch.float32) and keys.is_contiguous()
            and values.is_contiguous() and q.shape[-1] % 8 == 0 and kernels.available()):
        return torch.ops.leanlm.decode_attention(q, keys, values, length, keep, scale)
    batch, slots = q.shape[0], keys.shape[2]
    written = torch.arange(slots, device=keys.device) < length[:, None]  # (1 or batch, slots)
    mask = written if keep is None else written & keep[:, :slots].bool()
    mask = mask.expand(batch, slots)[:, None, None]  # (batch, 1, 1, slots)
    keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out[:, :, 0]


def ring_write(keys, values, k, v, slot, sink: int, window: int):
    """Write the step's K/V into a sliding-window layer's ring (see ``kvcache.swapped.RingWindowLayer``)
    → the number of written slots, as the 1-element length ``attend`` takes."""
    ring_slot = torch.where(slot < sink, slot, sink + (slot - sink) % window)
    keys.index_copy_(2, ring_slot, k[:, :, None])
    values.index_copy_(2, ring_slot, v[:, :, None])
    return torch.clamp(slot + 1, max=sink + window)


def decode_layers(model: nn.Module, ids, position_ids, slot, keep, keys: list, values: list,
                  policy_layers: list | None = None, rings: dict | None = None, chain: bool = False) -> torch.Tensor:
    """The step itself: ``ids`` (batch, 1) at ``position_ids`` (batch, 1), K/V written at cache slot
    ``slot`` (a 1-element tensor) of every layer's ``keys``/``values`` (batch, kv heads, slots, dim)
    → (batch, vocab) logits. A plain function of tensors, so ``torch.compile`` can take it whole.
    ``rings``: layer index -> (sink, window) of sliding-window layers, whose ``keys``/``values`` are
    rings (``static_cache.window_layers``; unpadded batches). ``policy_layers``: a policy cache's layers instead,
    each storing the step's K/V and attending over its own storage (``lean_attend``; eager only).
    ``chain``: the rows of ``ids`` are consecutive tokens of one sequence (speculative verification) over a
    cache of batch 1, written at slots ``slot`` (one per row); row i attends causally to slots
    [0, slot[i]], so each row's logits are those a one-token step would give."""
    rings = rings or {}
    inner = model.model
    x = inner.embed_tokens(ids)  # (batch, 1, hidden)
    cos, sin = inner.rotary_emb(x, position_ids)  # (batch, 1, head_dim): broadcasts over heads
    length = None if slot is None else slot + 1
    if chain and (rings or keep is not None or policy_layers is not None):
        raise LeanLMError("a chain of tokens decodes over a static cache without sliding-window layers or pads")
    for index, layer in enumerate(inner.layers):
        attn, mlp, batch = layer.self_attn, layer.mlp, ids.shape[0]
        h = rms_norm(layer.input_layernorm, x)
        q = rope(attn.q_proj(h).view(batch, -1, attn.head_dim), cos, sin)  # (batch, heads, dim)
        k = rope(attn.k_proj(h).view(batch, -1, attn.head_dim), cos, sin)  # (batch, kv heads, dim)
        v = attn.v_proj(h).view(batch, -1, attn.head_dim)
        if policy_layers is not None:
            out = policy_layers[index].lean_attend(q, k, v, attn.scaling)  # (batch, heads, dim)
        elif index in rings:
            written = ring_write(keys[index], values[index], k, v, slot, *rings[index])
            out = attend(q, keys[index], values[index], written, None, attn.scaling)
        else:
            # (batch, kv heads, new slots, dim): a chain's rows are new slots of the one cached sequence
            keys[index].index_copy_(2, slot, k.transpose(0, 1)[None] if chain else k[:, :, None])
            values[index].index_copy_(2, slot, v.transpose(0, 1)[None] if chain else v[:, :, None])
            out = attend(q, keys[index], values[index], length, keep, attn.scaling)
        x = x + attn.o_proj(out.reshape(batch, 1, -1))
        h = rms_norm(layer.post_attention_layernorm, x)
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    return model.lm_head(rms_norm(inner.norm, x))[:, -1]


_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LeanStep:
    """``step(ids, state) -> (batch, vocab) logits`` for one new token per sequence through a
    ``StaticCache`` (see the module doc); ``compile=True`` runs ``decode_layers`` compiled.
    ``step.chain(ids, state)`` runs a chain of tokens of one sequence (speculative verification)."""

    def __init__(self, model: nn.Module, compile: bool = False, policy: bool = False):
        self.model, self.policy = model, policy
        self.rings = window_layers(model)
        self.compile = compile and not policy  # a policy layer's storage changes shape as it fills: eager
        self.options = inductor_options()  # as the step is made: a later switch does not change it
        self.runs = {}  # chain? -> the function that runs decode_layers

    def function(self, chain: bool = False):
        """What runs ``decode_layers`` (for a chain or one token per sequence): compiled, or itself."""
        if not self.compile:
            return decode_layers
        if chain not in self.runs:
            key = (tuple(sorted(self.options.items())), chain)
            per_model = _compiled.setdefault(self.model, {})  # one compiled function per model, options and
            if key not in per_model:  # kind, reused by every cache and call
                per_model[key] = torch.compile(decode_layers, options=self.options)
            self.runs[chain] = per_model[key]
        return self.runs[chain]

    def _run(self, ids, positions, slots, keep, state, chain: bool = False) -> torch.Tensor:
        layers = state.cache.layers
        args = (self.model, ids, positions, slots, keep, [layer.keys for layer in layers],
                [layer.values for layer in layers], None, None if chain else self.rings)
        run = self.function(chain)
        try:
            logits = run(*args, chain=chain)
        except Exception as error:  # noqa: BLE001 - compilation failed (no compiler, unsupported op): go eager
            if run is decode_layers:
                raise
            log.warning("torch.compile of the lean decode step failed (%s: %s); decoding eagerly",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self.compile = False
            per_model = _compiled.get(self.model, {})  # the next step for this model compiles afresh
            for key in [key for key, function in per_model.items() if function is run]:
                del per_model[key]
            return decode_layers(*args, chain=chain)  # nothing ran yet, or it rewrites the same slots
        return logits.clone() if run is not decode_layers else logits  # compiled outputs may be reused

    def __call__(self, ids: torch.Tensor, state) -> torch.Tensor:
        layers = state.cache.layers
        if self.policy:
            logits = decode_layers(self.model, ids, state.position_ids(1), None, None, [], [], layers)
            state.advance(1)
            return logits
        slot = torch.tensor([state.seen], device=ids.device)  # the new token's cache slot (pads count)
        keep = state.mask  # (batch, slots) 1 = real token, or None
        if self.rings and keep is not None:
            raise LeanLMError("a model with sliding-window layers decodes unpadded batches only")
        logits = self._run(ids, state.position_ids(1).clamp(min=0), slot, keep, state)
        for index, layer in enumerate(layers):
            if index in self.rings:
                layer.seen += 1
            else:
                layer.cumulative_length.add_(1)  # transformers' own count stays in step with the slots written
        state.advance(1)
        return logits

    def chain(self, ids: torch.Tensor, state) -> torch.Tensor:
        """(1, q) consecutive tokens of one sequence → (q, vocab) logits, row i exactly what a one-token step
        after the first i tokens gives (the same kernels, causal lengths per row). ``state.rewind`` drops
        the tokens a speculative round rejects."""
        if self.policy or self.rings or state.mask is not None or ids.shape[0] != 1 or state.positions.shape[0] != 1:
            raise LeanLMError("a chain of tokens needs one unpadded sequence over a static cache, no sliding-window layers")
        count = ids.shape[1]
        room = capacity(state.cache)
        if room is None or state.seen + count > room:
            raise LeanLMError(f"a chain of {count} tokens after {state.seen} needs a static cache of at least "
                              f"{state.seen + count} slots, this one holds {room}")
        slots = state.seen + torch.arange(count, device=ids.device)  # (q,)
        positions = state.position_ids(count).clamp(min=0).reshape(count, 1)  # (q, 1)
        layers = state.cache.layers
        ids = ids.reshape(count, 1)
        for tensor in (ids, positions, slots):  # a compiled chain may grow dynamic in the cache size, never in
            torch._dynamo.mark_static(tensor, 0)  # its rows: a graph over symbolic rows sums otherwise (not bit for bit)
        logits = self._run(ids, positions, slots, None, state, chain=True)
        for layer in layers:
            layer.cumulative_length.add_(count)
        state.advance(count)
        return logits


_enabled = Switch(True)


def use_lean_step(enabled: bool):
    """Turn the lean step on or off inside the block (A/B timing against transformers' layer code)."""
    return _enabled.set(enabled)


def runs_lean(model: nn.Module) -> bool:
    """Whether a static cache would decode ``model`` through the lean step."""
    if not _enabled:
        return False
    reason = unsupported_reason(model)
    if reason is not None:
        log.debug("lean decode step off: %s", reason)
    return reason is None


def attends_itself(cache) -> bool:
    """A policy cache whose every layer can take a lean step (``lean_attend``: the quantized cache, and
    sink_window in full precision with text positions, whose layers say so with ``lean_ready``)."""
    layers = getattr(cache, "layers", None) or []
    return hasattr(cache, "next_position_ids") and bool(layers) and all(
        hasattr(layer, "lean_attend") and getattr(layer, "lean_ready", True) for layer in layers)


def lean_step(model: nn.Module, cache, compile: bool = False) -> LeanStep | None:
    """The lean step for ``model`` decoding through ``cache``, or None (the model's forward decodes)."""
    if not runs_lean(model):
        return None
    if is_static(cache):
        return LeanStep(model, compile)
    if window_layers(model):  # a swapped model's policy caches are not written for its rings
        return None
    return LeanStep(model, policy=True) if attends_itself(cache) else None
