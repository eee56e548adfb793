"""MLA-style latent KV: a joint low-rank latent of K and V with partial RoPE (transform + calibration fit)."""

from leanlm.transforms.latent_kv.transform import LatentKV, budget_ranks, convert, plan_layers

__all__ = ["LatentKV", "budget_ranks", "convert", "plan_layers"]
