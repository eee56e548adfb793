"""One decode engine: a static KV cache, one sampler, one decode loop, speculative decoding."""

from leanlm.engine.decode import DecodeState, generate, left_pad, model_context, prefill, stream
from leanlm.engine.sampling import Sampler, SamplingConfig, sample_rows
from leanlm.engine.slot_cache import SlotCache, slot_forward
from leanlm.engine.static_cache import held_bytes, is_static, static_cache

__all__ = ["DecodeState", "Sampler", "SamplingConfig", "generate", "held_bytes", "is_static", "left_pad",
           "model_context", "prefill", "sample_rows", "SlotCache", "slot_forward", "static_cache",
           "stream"]
