"""SentenceKV-style two-tier cache: sentence summaries in fast memory, token K/V in a slow store.

Much of K and V is redundant across the tokens of a sentence. So the text is cut into sentences, each
closed sentence keeps a small *summary* in fast memory, its token K/V go to a larger, slower tier, and
each step brings back only the sentences its queries need.

Segmentation (``segment``, pure): a sentence closes after a token whose text ends with ``.``, ``!``,
``?`` or a newline (``boundary_token_ids`` builds that table from a tokenizer once), or when it reaches
``max_sentence`` tokens. The first ``sink`` tokens of the text are attention sinks, in no sentence.
Cache layers only see K/V, so a hook on the base model feeds each step's token ids to a ``Segmenter``
that all layers of the cache share. Without a table (``use_tokenizer`` not called) or without token
ids (``inputs_embeds``), only the length rule applies. With a batch, a boundary in any row closes the
sentence for every row: the batch shares one segmentation.

Per layer (``SentenceTierLayer``):
- fast tier: sinks, the open sentence, one summary per closed sentence and KV head (the mean key;
  ``summary="pca"`` adds the top principal directions scaled by their spread, ``"bounds"`` the
  channel-wise min and max), and the token K/V of the retrieved sentences, kept in an LRU bounded
  by ``retrieve`` (B) sentences and ``capacity`` tokens, or (``for_budget``) by ``budget_tokens``:
  the retrieved sentences get what the other fast-tier tensors really held leave of the budget;
- slow tier (``SlowStore``): every closed sentence's token K/V — ``MemoryStore`` (CPU tensors, pinned
  when the model runs on a GPU) or ``MmapStore`` (raw bytes appended to one file per layer, read back
  through a memory map, so the slow tier can outgrow RAM). Token K/V really leave the fast tier: a
  sentence that is not retrieved is not held there at all (the published SentenceKV code masks).
- each step, an attention pre-hook picks the sentences to attend: first the latest closed ones
  (``recent`` of them and at least ``recent_share`` of ``capacity``), then the best ranked by the
  index, while they fit B and ``capacity``; it fetches those not resident, evicts the least recently
  used beyond the bounds, and resizes the step's causal mask to what this layer attends to (layers
  differ, the model builds one mask). Attention runs over sinks + retrieved sentences (text order) +
  open sentence + new tokens: with B >= the number of sentences that is the full cache, bit for bit.
- the index: ``"keys"`` scores the summaries with the step's queries (mean over the queries and the
  KV group's query heads of q·s_j, or a per-query softmax vote with ``select="vote"``; one choice
  per layer, shared by the KV heads and the batch); ``"minilm"`` asks a frozen sentence encoder
  (``sentence/index.py``) which closed sentences resemble the last ``query_tokens`` tokens — one
  ranking for all layers; ``"auto"`` (default) is minilm when a tokenizer was given and its weights
  are installed. Measured on SmolLM2-135M, minilm is the better index by far (README).
- a sentence that closes is summarized, written to the slow store and enters the LRU as most
  recently used (the next tokens are likely to look at it).

Bytes: ``nbytes()`` is the fast tier (what a budget counts); ``slow_nbytes()`` the slow tier;
``fetched_bytes`` / ``written_bytes`` the traffic between them, and ``log`` one ``StepLog`` per step
(new tokens, bytes moved, sentences attended). ``tier_stats(cache)`` sums them over layers, with the
bytes moved per generated (single-token) step. On a CPU-only machine both tiers live in RAM (the mmap
store in the page cache): the tiers are separate tensors and counted honestly, not separate devices.

Coarse tier (``coarse="mean"|"learned"``): a closed sentence that is not fetched is not dropped but
seen as one pseudo-token rebuilt from its mean key and mean value (the fast tier then also keeps the
mean value), with an attention-logit bias log n_j; ``"learned"`` maps are trained by distillation on
WikiText-2 validation (``leanlm.kvcache.sentence.coarse``). The pseudo-tokens are rebuilt each step:
transient, counted in ``peak``. The mask becomes a float mask per query head to carry the bias.

Not done yet: per-head selection, overlapping fetches with compute (prefetch), a quantized slow
tier, per-row segmentation for batches.

Modules: ``segment`` (segmentation), ``stores`` (slow tier), ``summary`` (summaries and their scores),
``layer`` (one layer's fast tier), ``hooks`` (token ids in, selection and mask), ``policy`` (the
registered policy), ``stats`` (tier bytes and traffic), ``index`` (the MiniLM sentence index),
``coarse`` (the coarse tier's maps and their training).
"""

from leanlm.kvcache.sentence.hooks import add_past_bias, feed_token_ids, fit_mask, select_and_fit_mask, step_cache
from leanlm.kvcache.sentence.layer import SentenceTierLayer, StepLog
from leanlm.kvcache.sentence.policy import SentenceTier, warn_no_room
from leanlm.kvcache.sentence.segment import SINK, Segmenter, SegmentState, boundary_token_ids, segment
from leanlm.kvcache.sentence.stats import TierStats, tier_stats
from leanlm.kvcache.sentence.stores import SLOW_STORES, MemoryStore, MmapStore, SlowStore
from leanlm.kvcache.sentence.summary import sentence_scores, summarize

__all__ = ["MemoryStore", "MmapStore", "SINK", "SLOW_STORES", "SegmentState", "Segmenter", "SentenceTier",
           "SentenceTierLayer", "SlowStore", "StepLog", "TierStats", "add_past_bias", "boundary_token_ids",
           "feed_token_ids", "fit_mask", "segment", "select_and_fit_mask", "sentence_scores", "step_cache",
           "summarize", "tier_stats", "warn_no_room"]
