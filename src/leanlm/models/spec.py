"""ModelSpec: the shape facts of a decoder-only model that every room of leanlm needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Layers, heads and widths, read from the modules themselves (so pruned models report truthfully)."""

    num_layers: int
    hidden_size: int
    head_dim: int
    vocab_size: int
    heads_per_layer: tuple[int, ...]  # query heads in each layer
    kv_heads_per_layer: tuple[int, ...]  # key/value heads in each layer
    intermediate_per_layer: tuple[int, ...]  # MLP channels in each layer

    @property
    def num_heads(self) -> int:
        """Query heads of the first layer (all layers, unless pruned per layer)."""
        return self.heads_per_layer[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads_per_layer[0]

    @property
    def total_heads(self) -> int:
        return sum(self.heads_per_layer)

    @property
    def total_kv_heads(self) -> int:
        return sum(self.kv_heads_per_layer)

    @property
    def uniform(self) -> bool:
        return len(set(self.heads_per_layer)) == 1 and len(set(self.kv_heads_per_layer)) == 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config) -> "ModelSpec":
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
        return cls(
            num_layers=layers,
            hidden_size=config.hidden_size,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            heads_per_layer=(heads,) * layers,
            kv_heads_per_layer=(kv_heads,) * layers,
            intermediate_per_layer=(config.intermediate_size,) * layers,
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = decoder_layers(model)
        return cls(
            num_layers=len(layers),
            hidden_size=config.hidden_size,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            heads_per_layer=tuple(layer.self_attn.q_proj.out_features // head_dim for layer in layers),
            kv_heads_per_layer=tuple(layer.self_attn.k_proj.out_features // head_dim for layer in layers),
            intermediate_per_layer=tuple(layer.mlp.up_proj.out_features for layer in layers),
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Llama-style causal LM."""
    return model.model.layers
