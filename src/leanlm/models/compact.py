"""The compact checkpoint format: per-layer shapes that a stock transformers config cannot express.

A stock Llama config has one ``num_attention_heads``, one ``num_key_value_heads`` and one
``intermediate_size`` for every layer. After per-layer ("global") pruning the layers differ, so we
save with ``save_pretrained`` as usual (config.json + safetensors) and add these config keys:

- ``leanlm_heads_per_layer``: list[int], query heads of each layer
- ``leanlm_kv_heads_per_layer``: list[int], key/value heads of each layer
- ``leanlm_intermediate_per_layer``: list[int], MLP channels of each layer
- ``leanlm_kept_heads`` (informational, used by ``pad_heads``): per layer, the positions of the kept
  query heads among the stock ``num_attention_heads`` (their KV group is position // group size)
- ``leanlm_layers_kept`` (informational, written by layer pruning): original indices of the kept
  blocks; the config itself is stock (``num_hidden_layers`` shrinks)

The stock keys keep the original counts, so the config still validates and ``pad_heads`` knows what
to pad back to. ``explicit head_dim`` is always written. ``load_compact`` builds the stock model,
resizes each layer's Linears to the listed shapes and loads the safetensors strictly. A config whose
layers all agree is written in stock form instead (no extension), so plain ``from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from leanlm.errors import LeanLMError
from leanlm.models.arch import arch_of
from leanlm.models.latent_attention import LATENT_KEY, install_latent_shells
from leanlm.models.spec import ModelSpec
from leanlm.models.weights import parse_dtype, resize_linear, strip_gguf_quantization

log = logging.getLogger(__name__)

HEADS_KEY = "leanlm_heads_per_layer"
KV_HEADS_KEY = "leanlm_kv_heads_per_layer"
INTERMEDIATE_KEY = "leanlm_intermediate_per_layer"
KEPT_HEADS_KEY = "leanlm_kept_heads"
LAYERS_KEPT_KEY = "leanlm_layers_kept"
SHAPE_KEYS = (HEADS_KEY, KV_HEADS_KEY, INTERMEDIATE_KEY)
SWAP_KEY = "leanlm_swap_attention"  # swapped attention layers (transforms/swap_attention/base.py): rebuilt on load


def is_compact(config) -> bool:
    """True when the config (object or dict) lists per-layer shapes, latent-KV or swapped layers, i.e. needs ``load_compact``."""
    keys = config if isinstance(config, dict) else vars(config)
    return any(keys.get(key) is not None for key in (*SHAPE_KEYS, LATENT_KEY, SWAP_KEY))


def drop_key(config, key: str) -> None:
    if hasattr(config, key):
        delattr(config, key)


def stock_config_accepts(config, heads: int, kv_heads: int) -> bool:
    """Whether the stock config class validates these head counts (Llama wants hidden % heads == 0)."""
    fields = {**config.to_dict(), "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    try:
        type(config)(**fields)
    except (ValueError, StrictDataclassError):
        return False
    return True


def sync_shape_config(model: PreTrainedModel) -> None:
    """Rewrite the config from the module shapes: stock counts when layers agree, else the extension."""
    config, spec = model.config, ModelSpec.from_model(model)
    config.num_hidden_layers = spec.num_layers
    config.head_dim = spec.head_dim  # explicit: hidden_size // heads is wrong once heads are pruned
    _sync_heads(config, spec)
    sizes = spec.intermediate_per_layer
    if len(set(sizes)) == 1:
        config.intermediate_size = sizes[0]
        drop_key(config, INTERMEDIATE_KEY)
    else:
        setattr(config, INTERMEDIATE_KEY, list(sizes))


def _sync_heads(config, spec: ModelSpec) -> None:
    heads, kv_heads = spec.heads_per_layer, spec.kv_heads_per_layer
    uniform = len(set(heads)) == 1 and len(set(kv_heads)) == 1
    if uniform and (heads[0], kv_heads[0]) == (config.num_attention_heads, config.num_key_value_heads):
        stock = True  # nothing changed in the head counts
    else:
        stock = uniform and stock_config_accepts(config, heads[0], kv_heads[0])
    if stock:
        config.num_attention_heads, config.num_key_value_heads = heads[0], kv_heads[0]
        for key in (HEADS_KEY, KV_HEADS_KEY, KEPT_HEADS_KEY):
            drop_key(config, key)
        return
    if uniform:
        log.info(
            "every layer has %d heads, but the stock %s rejects that count (hidden size %d): "
            "keeping the compact per-layer form (load it with load_compact, or pad_heads for a stock copy)",
            heads[0], type(config).__name__, config.hidden_size,
        )
    setattr(config, HEADS_KEY, list(heads))
    setattr(config, KV_HEADS_KEY, list(kv_heads))


def save_compact(model: PreTrainedModel, tokenizer, path: str | Path) -> Path:
    """Save a (possibly per-layer pruned) model with ``save_pretrained`` plus the config extension."""
    path = Path(path)
    strip_gguf_quantization(model)  # a GGUF-loaded model refuses save_pretrained otherwise
    sync_shape_config(model)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def resize_to_config(model: PreTrainedModel) -> None:
    """Give every layer's Linears the shapes the config extension lists (weights left uninitialized)."""
    config = model.config
    arch = arch_of(model)
    n = len(arch.layers)
    head_dim, hidden = config.head_dim, config.hidden_size
    heads = getattr(config, HEADS_KEY, None) or [config.num_attention_heads] * n
    kv_heads = getattr(config, KV_HEADS_KEY, None) or [config.num_key_value_heads] * n
    inter = getattr(config, INTERMEDIATE_KEY, None) or [config.intermediate_size] * n
    if not len(heads) == len(kv_heads) == len(inter) == n:
        raise LeanLMError(f"the compact config lists per-layer shapes for a different number of layers than {n}")
    for index, h, kv, i in zip(range(n), heads, kv_heads, inter):
        attn, mlp = arch.attention(index), arch.mlp(index)
        resize_linear(attn.q_proj, h * head_dim, hidden)
        resize_linear(attn.k_proj, kv * head_dim, hidden)
        resize_linear(attn.v_proj, kv * head_dim, hidden)
        resize_linear(attn.o_proj, hidden, h * head_dim)
        attn.set_group_size()
        resize_linear(mlp.gate_proj, i, hidden)
        resize_linear(mlp.up_proj, i, hidden)
        resize_linear(mlp.down_proj, hidden, i)
    if getattr(config, LATENT_KEY, None) is not None:  # latent_kv: K/V projections replaced by a latent
        install_latent_shells(model)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    single = path / "model.safetensors"
    if not single.is_file():
        raise LeanLMError(f"'{path}' holds no model.safetensors (a compact checkpoint is saved as safetensors)")
    return load_file(single)


def load_compact(path: str | Path, dtype: str | torch.dtype = "float32") -> PreTrainedModel:
    """Load a checkpoint written by ``save_compact``: stock model, resized layers, strict weight load."""
    path = Path(path)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    config = AutoConfig.from_pretrained(path)
    # A normal (random) init, not the meta device: non-persistent buffers such as the rotary
    # inv_freq are computed at init and are not in the checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    resize_to_config(model)
    if getattr(config, SWAP_KEY, None):
        from leanlm.transforms.swap_attention import rebuild_swaps  # transforms import models: import when needed

        rebuild_swaps(model)
    state = _read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) are saved once; the other name shares the same tensor.
    tied = _tied_names(model)
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise LeanLMError(
            f"the compact checkpoint in '{path}' does not match its config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(torch_dtype).eval()


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share their tensor with an earlier-named parameter."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.data_ptr() in seen:
            tied.add(name)
        seen.add(param.data_ptr())
    return tied


def maybe_load_compact(path: str | Path, dtype: str | torch.dtype = "float32") -> PreTrainedModel | None:
    """``load_compact(path)`` when ``path`` is a directory holding a compact checkpoint, else None.

    Cheap for any other source: it only reads config.json, and only when ``path`` is a local directory.
    """
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return load_compact(config_file.parent, dtype) if is_compact(config) else None
