"""Config keys leanlm adds to a saved model's config.json for layers that stock transformers cannot rebuild.

Kept in a module with no imports so the loader can ask "is this a leanlm layout?" without importing
the attention modules (which pull in ``kvcache``, itself built on ``models``).
"""

LATENT_KEY = "leanlm_latent_kv"  # latent-KV layers: {"rank_per_layer": [...], "rope_pairs": r}
SWAP_KEY = "leanlm_swap_attention"  # swapped attention layers: {layer index: {"kind": ..., settings}}
