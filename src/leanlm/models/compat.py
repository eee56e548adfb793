"""What differs between the transformers versions leanlm supports (5.0 up to 5.40)."""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

# transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache``; the old name warns
# on every call until 5.40 removes it. Every model class of one install follows the same convention.
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def with_cache(cache) -> dict:
    """``model(ids, **with_cache(cache))``: the cache under the keyword this transformers takes."""
    return {CACHE_KEYWORD: cache}
