"""One decode engine: a static KV cache, one sampler, one decode loop, speculative decoding."""

from leanlm.engine.decode import DecodeState, generate, left_pad, model_context, prefill, stream
from leanlm.engine.sampling import Sampler, SamplingConfig
from leanlm.engine.static_cache import held_bytes, is_static, static_cache

__all__ = ["DecodeState", "Sampler", "SamplingConfig", "generate", "held_bytes", "is_static", "left_pad",
           "model_context", "prefill", "static_cache", "stream"]
