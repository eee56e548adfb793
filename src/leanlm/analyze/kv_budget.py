"""KV-cache budget: bytes per token and per sequence under MHA, GQA, MQA, an MLA latent and quantized K/V.

Core formula (every token, every layer stores one K and one V vector per KV head):

    bytes/token = 2 × Σ_layers kv_heads_l × head_dim × bytes_per_value

Pure arithmetic on a ModelSpec: no weights, no data. The ``evaluate`` room checks it against the
bytes a real cache holds (``analytic_kv_bytes_per_token``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec


@dataclass(frozen=True)
class KVBudgetRow:
    """One cache layout. ``ratio``: its bytes_per_token over the model's own layout at the same dtype_bytes."""

    name: str
    kv_heads_total: int  # KV heads summed over layers (0 for the MLA latent, which has none)
    bytes_per_token: float
    bytes_per_sequence: float  # bytes_per_token × seq_len × batch
    ratio: float
    formula: str


def analytic_kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """2 (K and V) × Σ_layers kv_heads_l × head_dim × dtype_bytes."""
    return 2 * sum(spec.kv_heads_per_layer) * spec.head_dim * dtype_bytes


def quantized_bytes_per_token(spec: ModelSpec, bits: int, group: int) -> float:
    """Packed ``bits``-bit K and V in the model's layout, plus an fp16 scale and zero point per group.

    Groups run along each layer's K (or V) vector of one token: ceil(kv_heads_l × head_dim / group).
    """
    total = 0.0
    for kv_heads in spec.kv_heads_per_layer:
        values = kv_heads * spec.head_dim  # per token, per layer, for K (and again for V)
        total += 2 * (values * bits / 8 + math.ceil(values / group) * 2 * 2)  # 2 fp16 numbers per group
    return total


def _check(spec: ModelSpec, seq_len: int, batch: int, dtype_bytes: int, quant_bits, quant_group: int, latent_dim) -> None:
    if seq_len < 1 or batch < 1 or dtype_bytes < 1:
        raise LeanLMError(f"seq_len, batch and dtype_bytes must be positive, got {seq_len}, {batch}, {dtype_bytes}")
    if quant_group < 1 or any(not 1 <= bits <= 16 for bits in quant_bits):
        raise LeanLMError(f"quantization needs bits in 1..16 and a positive group size, got {list(quant_bits)} and {quant_group}")
    if latent_dim is not None and latent_dim < 1:
        raise LeanLMError(f"latent_dim must be positive, got {latent_dim}")


def kv_budget(
    spec: ModelSpec,
    seq_len: int = 2048,
    batch: int = 1,
    dtype_bytes: int = 2,
    latent_dim: int | None = None,
    quant_bits: tuple[int, ...] = (8, 4, 2),
    quant_group: int = 64,
) -> list[KVBudgetRow]:
    """Rows: MHA, the model's own layout, MQA, an MLA latent, then the model's layout quantized."""
    _check(spec, seq_len, batch, dtype_bytes, quant_bits, quant_group, latent_dim)
    layers, hd, b = spec.num_layers, spec.head_dim, dtype_bytes
    tokens = seq_len * batch
    own = analytic_kv_bytes_per_token(spec, b)
    if spec.kv_heads_per_layer == spec.heads_per_layer:
        own_name = "MHA (model)"
    elif all(kv == 1 for kv in spec.kv_heads_per_layer):
        own_name = "MQA (model)"
    else:
        own_name = "GQA (model)"

    def row(name: str, kv_total: int, per_token: float, formula: str) -> KVBudgetRow:
        return KVBudgetRow(name, kv_total, per_token, per_token * tokens, per_token / own, formula)

    mha = analytic_kv_bytes_per_token(_with_kv(spec, spec.heads_per_layer), b)
    mqa = analytic_kv_bytes_per_token(_with_kv(spec, (1,) * layers), b)
    # MLA (DeepSeek-V2) caches one compressed latent per token per layer, from which K and V are
    # both re-expanded. Default width: half of the model's K+V (kv_heads × head_dim of layer 0).
    # Its small decoupled RoPE key is left out.
    latent = latent_dim or spec.kv_heads_per_layer[0] * hd
    rows = [
        row("MHA", spec.total_heads, mha, f"2 × {spec.total_heads} heads × {hd} × {b} B"),
        row(own_name, spec.total_kv_heads, own, f"2 × {spec.total_kv_heads} kv heads × {hd} × {b} B"),
        row("MQA", layers, mqa, f"2 × {layers} layers × 1 kv head × {hd} × {b} B"),
        row(f"MLA latent (d={latent})", 0, layers * latent * b, f"{layers} layers × {latent} latent × {b} B"),
    ]
    if any(spec.window_per_layer):
        # Sliding-window layers (Gemma 3's local layers) hold at most window - 1 tokens: at seq_len the
        # model's own cache is smaller than every layer full. Per token = bytes of the sequence / tokens.
        held = [min(seq_len, w - 1) if w else seq_len for w in spec.window_per_layer]
        sliding = 2 * sum(kv * hd * b * h for kv, h in zip(spec.kv_heads_per_layer, held)) / seq_len
        local = sum(1 for w in spec.window_per_layer if w)
        rows.append(row(f"{own_name.split()[0]} (model, {local} sliding-window layers) at {seq_len} tokens",
                        spec.total_kv_heads, sliding,
                        f"2 × Σ_l kv_heads_l × {hd} × {b} B × min({seq_len}, window_l - 1) / {seq_len}"))
    for bits in quant_bits:
        per_token = quantized_bytes_per_token(spec, bits, quant_group)
        formula = (f"2 × {spec.total_kv_heads} kv heads × {hd} × {bits}/8 B "
                   f"+ fp16 scale and zero per {quant_group} values")
        rows.append(row(f"int{bits} K/V", spec.total_kv_heads, per_token, formula))
    return rows


def _with_kv(spec: ModelSpec, kv_heads: tuple[int, ...]) -> ModelSpec:
    return replace(spec, kv_heads_per_layer=tuple(kv_heads))


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_kv_table(rows: list[KVBudgetRow]) -> str:
    """A Markdown table with human units."""
    lines = [
        "| layout | KV heads (all layers) | bytes / token | bytes / sequence | vs model | formula (per token) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        heads = str(r.kv_heads_total) if r.kv_heads_total else "-"
        lines.append(f"| {r.name} | {heads} | {human_bytes(r.bytes_per_token)} | {human_bytes(r.bytes_per_sequence)} "
                     f"| {r.ratio:.3f}× | {r.formula} |")
    return "\n".join(lines)
