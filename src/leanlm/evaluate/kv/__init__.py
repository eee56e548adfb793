"""KV-cache policies judged four ways: streaming perplexity, continuation, passkey, long generation.

Every protocol takes ``(model, tokenizer, policy, protocol)`` and returns a dataclass whose
``to_dict()`` records the protocol, the dtype and the policy. ``policy`` is one of:
- ``None``: uncompressed, a plain transformers ``DynamicCache``;
- a ``CachePolicy`` (``leanlm.kvcache.make_policy(...)``), attached afresh for every window/prompt;
- a factory ``tokens -> CachePolicy``, called with the number of tokens the cache is sized for
  (streaming and continuation: ``context``; passkey: each prompt's length; long generation: prompt +
  new tokens), so ``lambda n: make_policy("heavy_hitter", 0.25, n)`` means 25 % of *that* text.

Every forward passes explicit ``position_ids = cache.next_position_ids(n)``: an evicting cache holds
fewer tokens than the text has seen, so the positions cannot be inferred from its length.

Quality against the uncompressed cache (KL). Full-vocabulary log-probs are big (8192 tokens × 49152
× 4 bytes = 1.6 GB), so a reference stores the uncompressed run's *final hidden states* instead
(post-norm, model dtype: 8192 × 576 × 2 bytes = 9.4 MB for SmolLM2) and rebuilds the reference
log-probs exactly, slice by slice, with the output head (``lm_head``, as LlamaForCausalLM does).
The KL is exact over the whole vocabulary, the reference costs one uncompressed run, and it is
reused for any number of policies (``streaming_reference`` / ``continuation_reference``). Passing
``reference=True`` instead runs the uncompressed window just before the policy's, window by window,
keeping nothing. Policy and reference logits go through the same slicing, so a cache that changes
nothing gives KL exactly 0.

Modules: ``common`` (policies, caches, forwards), ``scoring`` (NLL, KL, the reference), one module
per protocol: ``streaming``, ``continuation``, ``passkey``, ``long_generation``.
"""

from leanlm.evaluate.kv.common import PolicyArg, describe_policy, resolve_policy
from leanlm.evaluate.kv.continuation import (ContinuationProtocol, continuation_perplexity, continuation_reference,
                                             continuation_windows)
from leanlm.evaluate.kv.long_generation import (LongGenerationProtocol, LongGenerationResult, long_generation,
                                                plot_long_generation)
from leanlm.evaluate.kv.passkey import (PASSKEY_INTRO, PASSKEY_QUESTION, PASSKEY_SENTENCE, PasskeyItem, PasskeyProtocol,
                                        PasskeyResult, normalise, passkey_eval, passkey_prompts)
from leanlm.evaluate.kv.scoring import KVQualityResult, UncompressedReference
from leanlm.evaluate.kv.streaming import StreamingProtocol, streaming_perplexity, streaming_reference, streaming_windows

__all__ = [
    "PASSKEY_INTRO", "PASSKEY_QUESTION", "PASSKEY_SENTENCE", "PolicyArg", "describe_policy",
    "ContinuationProtocol", "KVQualityResult", "LongGenerationProtocol", "LongGenerationResult", "PasskeyItem",
    "PasskeyProtocol", "PasskeyResult", "StreamingProtocol", "UncompressedReference", "continuation_perplexity",
    "continuation_reference", "continuation_windows", "long_generation", "normalise", "passkey_eval",
    "passkey_prompts", "plot_long_generation", "resolve_policy", "streaming_perplexity", "streaming_reference",
    "streaming_windows",
]
