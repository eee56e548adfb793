"""``torch.compile`` of one decode step (one token per sequence through a static cache).

Compiling removes most of the Python and framework overhead of a step (30 layers of small ops at
batch 1). It needs a static cache (fixed shapes and addresses): for a growing DynamicCache or a
policy cache the engine decodes eagerly. Compilation may be unavailable (no C++ compiler, an op
inductor does not lower): the first call then logs a warning and the engine decodes eagerly.
One compiled function per model is kept (weakly) and reused across calls of the same shapes.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from leanlm.engine.static_cache import is_static
from leanlm.models.compat import with_cache
from leanlm.switch import Switch

log = logging.getLogger(__name__)

COMPILE_MODE = "default"  # "max-autotune-no-cudagraphs" searches kernels longer; measured no gain on CPU here
_cpp_wrapper = Switch(os.environ.get("LEANLM_CPP_WRAPPER", "1") != "0")


def inductor_options() -> dict:
    """Inductor options of leanlm's compiled decode step (``engine.lean_step``). The C++ wrapper calls a
    step's ~300 generated kernels and opaque ops from C++ instead of a Python wrapper: 17.0 -> 14.7 ms per
    bf16 SmolLM2 step at batch 1 on this project's 2-core machine (median of 5 alternated rounds), for a
    longer first compilation (~2 min instead of ~40 s; inductor's cache keeps it for later processes).
    ``LEANLM_CPP_WRAPPER=0`` (or ``use_cpp_wrapper(False)``) keeps the Python wrapper.

    ``emulate_precision_casts``: a fused kernel rounds its bf16 intermediates (a residual sum before its
    RMSNorm) as the eager ops do, instead of keeping them in float32; without it a step compiled for one
    row and one compiled for a chain of rows (speculative verification) fuse differently and their logits
    differ in the last bits, which flips near-tied greedy tokens. With it, compiled speculative decoding gave the
    compiled plain engine's greedy output token for token on the real model (5 prompts, k = 2, 3, 4). Compiled
    and eager steps still differ in the last bits (other reduction code), as before."""
    import torch._inductor.config as inductor_config  # lazy: importing inductor takes a while

    # round bf16 intermediates as eager does (see above); older torch builds lack the option
    options = {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else {}
    return options | ({"cpp_wrapper": True} if _cpp_wrapper else {})


def use_cpp_wrapper(enabled: bool):
    """Compile decode steps with (True) or without inductor's C++ wrapper inside the block (A/B timing)."""
    return _cpp_wrapper.set(enabled)


_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_failed: weakref.WeakSet = weakref.WeakSet()


def _decode_step(model, ids, cache, position_ids, attention_mask):
    out = model(ids, **with_cache(cache), position_ids=position_ids, attention_mask=attention_mask,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]  # (batch, vocab)


def compiled_step(model, cache, mode: str | None = None):
    """A callable ``(ids, state) -> (batch, vocab) logits`` running the compiled step, or None when the
    cache cannot be compiled (with a logged reason). The callable returns None if compilation fails."""
    if not is_static(cache):
        log.warning("--compile needs a static cache; this %s decodes eagerly", type(cache).__name__)
        return None
    if model in _failed:
        return None
    if model not in _compiled:
        _compiled[model] = torch.compile(_decode_step, mode=mode or COMPILE_MODE, dynamic=False)
    fn = _compiled[model]

    def step(ids, state):
        position_ids = state.position_ids(ids.shape[1]).clamp(min=0)
        try:
            logits = fn(model, ids, state.cache, position_ids, state.step_mask(ids.shape[1]))
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager decoding
            log.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            _failed.add(model)
            _compiled.pop(model, None)
            return None
        state.advance(ids.shape[1])
        return logits.clone()  # the compiled graph may reuse its output buffer on the next call

    return step
