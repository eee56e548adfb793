"""ModelSpec: the shape facts of a decoder-only model that every room of leanlm needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from leanlm.models.arch import arch_of, head_dim_of


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
    # Keys a query sees in each layer: the sliding window (Gemma 3's local layers), None for all; empty: all.
    window_per_layer: tuple[int | None, ...] = ()

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
        head_dim = head_dim_of(config)
        layers = config.num_hidden_layers
        return cls(
            num_layers=layers,
            hidden_size=config.hidden_size,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            heads_per_layer=(heads,) * layers,
            kv_heads_per_layer=(kv_heads,) * layers,
            intermediate_per_layer=(config.intermediate_size,) * layers,
            window_per_layer=windows_of(config, layers),
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        config, arch = model.config, arch_of(model)
        attentions = arch.attentions()
        return cls(
            num_layers=len(attentions),
            hidden_size=config.hidden_size,
            head_dim=head_dim_of(config),
            vocab_size=config.vocab_size,
            heads_per_layer=tuple(view.num_heads for view in attentions),
            kv_heads_per_layer=tuple(view.num_kv_heads for view in attentions),
            intermediate_per_layer=tuple(arch.mlp(i).width for i in range(len(attentions))),
            window_per_layer=windows_of(config, len(attentions)),
        )


def windows_of(config, layers: int) -> tuple[int | None, ...]:
    """Per layer, the sliding window of a model that interleaves local layers, else () (all full)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not types or not window or "sliding_attention" not in types[:layers]:
        return ()
    return tuple(window if kind == "sliding_attention" else None for kind in types[:layers])
