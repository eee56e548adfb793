"""Text sampled from the original model itself: recovery data that is the teacher's own distribution.

Samples start from varied short prompts or from BOS (``teacher_prompts``), are drawn at temperature 1
through the engine's one decode loop (``leanlm.engine.decode.generate``, batched, left-padded),
bounded in length, and deduplicated (a sample whose prompt and first 32 generated tokens repeat an
earlier one is dropped). The stream is prompt + generation of each sample, separated by EOS.

Generated once and cached under ``<cache>/teacher/<key>/`` where ``key`` is the sha256 of the model's
weight files, the tokenizer's vocabulary and every setting but ``tokens`` (so a larger ``tokens``
extends a cache and a smaller one reads its prefix; any other change starts a new cache). Each batch
is one shard written atomically as it finishes; an interrupted generation resumes from its shards
and gives exactly the stream an uninterrupted one would (shard i is seeded by (seed, i)).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leanlm.data.sources.base import DataContext, DataSource, register
from leanlm.data.sources.teacher_prompts import CHAT_REQUESTS, KINDS, TEXT_OPENERS
from leanlm.errors import LeanLMError

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the stream's construction changes: old caches are then not reused
DEDUP_PREFIX = 32
MAX_EMPTY_SHARDS = 5  # give up when this many batches in a row keep no sample
PROMPT_KINDS = ("mixed", *KINDS)


@register
@dataclass
class TeacherSource(DataSource):
    """Samples of the original model (temperature 1 by default), generated once and cached."""

    name = "teacher"
    tokens: int = field(default=40_000, metadata={"help": "tokens in the stream (prompts + samples)"})
    max_new_tokens: int = field(default=256, metadata={"help": "length bound of each sample"})
    min_new_tokens: int = field(default=16, metadata={"help": "shorter samples (early EOS) are dropped"})
    batch_size: int = field(default=16, metadata={"help": "samples generated together (one shard)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "0 = the full distribution"})
    prompts: str = field(default="mixed", metadata={"help": f"where samples start: {' | '.join(PROMPT_KINDS)}"})
    seed: int = field(default=0, metadata={"help": "seeds prompts and sampling"})
    dtype: str = field(default="bfloat16", metadata={"help": "dtype the teacher generates in"})

    def check(self) -> None:
        if self.tokens < 2 or self.max_new_tokens < 1 or self.batch_size < 1 or self.min_new_tokens < 0:
            raise LeanLMError("teacher data needs tokens >= 2, max_new_tokens >= 1, batch_size >= 1, min_new_tokens >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise LeanLMError(f"teacher min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if self.temperature <= 0 or self.top_k < 0:
            raise LeanLMError(f"teacher data samples: temperature must be > 0 and top_k >= 0, got {self.temperature}, {self.top_k}")
        if self.prompts not in PROMPT_KINDS:
            raise LeanLMError(f"teacher prompts must be one of {', '.join(PROMPT_KINDS)}, got '{self.prompts}'")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise LeanLMError(f"teacher dtype must be bfloat16, float32 or float16, got '{self.dtype}'")

    # ------------------------------------------------------------------ cache identity

    def cache_key(self, ctx: DataContext) -> str:
        if ctx.model is None:
            raise LeanLMError("teacher data needs the original model's name or path")
        settings = {k: v for k, v in asdict(self).items() if k != "tokens"}
        identity = {"format": FORMAT, "model": model_fingerprint(ctx.model), "tokenizer": tokenizer_fingerprint(ctx.tokenizer),
                    "settings": settings}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def cache_dir(self, ctx: DataContext) -> Path:
        from leanlm.models.loading import cache_root

        return cache_root() / "teacher" / self.cache_key(ctx)

    # ------------------------------------------------------------------ the stream

    def token_ids(self, ctx: DataContext) -> torch.Tensor:
        self.check()
        directory = self.cache_dir(ctx)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "settings.json").is_file():  # for people reading the cache; the key is the identity
            _atomic_json(directory / "settings.json", {"model": ctx.model, **asdict(self), "tokens": None, "format": FORMAT})
        shards, stream = self._read_shards(directory, ctx.tokenizer)
        if len(stream) < self.tokens:
            with _generation_lock(directory):  # another process generating the same text: wait, then read its shards
                shards, stream = self._read_shards(directory, ctx.tokenizer)
                if len(stream) < self.tokens:
                    shards, stream = self._generate(ctx, directory, shards, stream)
        ids = torch.tensor(stream[: self.tokens], dtype=torch.long)  # (tokens,)
        self.__dict__["_read"] = {"cache": str(directory), "shards": len(shards),
                                  "samples": sum(len(s["samples"]) for s in shards),
                                  "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                                  "generation": _speed(shards)}
        return ids

    def _read_shards(self, directory: Path, tokenizer) -> tuple[list[dict], list[int]]:
        shards, stream = [], []
        while (path := _shard_path(directory, len(shards))).is_file() and len(stream) < self.tokens:
            shard = json.loads(path.read_text())
            shards.append(shard)
            stream += _shard_stream(shard, _separator(tokenizer))
        return shards, stream

    def _generate(self, ctx: DataContext, directory: Path, shards: list[dict], stream: list[int]):
        model = self._model(ctx)
        seen = {_dedup_key(s) for shard in shards for s in shard["samples"]}
        bar = tqdm(total=self.tokens, initial=min(len(stream), self.tokens), unit="tok", desc="teacher text", leave=False)
        made, started, empty = 0, time.perf_counter(), 0
        try:
            while len(stream) < self.tokens:
                shard = self._generate_shard(model, ctx.tokenizer, len(shards), seen)
                empty = 0 if shard["samples"] else empty + 1
                if empty == MAX_EMPTY_SHARDS:
                    raise LeanLMError(f"the teacher kept {MAX_EMPTY_SHARDS} batches in a row of samples shorter than "
                                      f"{self.min_new_tokens} tokens or duplicates; lower min_new_tokens or change the prompts")
                _atomic_json(_shard_path(directory, len(shards)), shard)
                shards.append(shard)
                added = _shard_stream(shard, _separator(ctx.tokenizer))
                stream += added
                made += shard["generated_tokens"]
                bar.update(min(len(added), max(0, self.tokens - bar.n)))
                bar.set_postfix_str(f"{made / (time.perf_counter() - started):.1f} generated tok/s")
        finally:
            bar.close()
        speed = _speed(shards)
        log.info("teacher text: %d tokens in %d shards at %.1f generated tokens/s (wall; %.1f per CPU-second)",
                 len(stream), len(shards), speed["tokens_per_second"], speed["tokens_per_cpu_second"])
        return shards, stream

    def _model(self, ctx: DataContext):
        from leanlm.models import load_model, parse_dtype

        dtype = parse_dtype(self.dtype)
        if ctx.loaded is not None:
            model = ctx.loaded if ctx.loaded.dtype == dtype else copy.deepcopy(ctx.loaded).to(dtype)
            return model.eval()
        log.info("loading %s (%s) to generate teacher text", ctx.model, self.dtype)
        return load_model(ctx.model, self.dtype, ctx.device)

    def _generate_shard(self, model, tokenizer, index: int, seen: set) -> dict:
        from leanlm.engine.decode import generate, left_pad
        from leanlm.engine.sampling import SamplingConfig

        seed = self.seed * 1_000_003 + index
        generator = torch.Generator().manual_seed(seed)
        prompts = [self._prompt(tokenizer, generator) for _ in range(self.batch_size)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _separator(tokenizer)
        ids, mask = left_pad(prompts, pad, device=model.device)  # (batch, longest prompt)
        sampling = SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=1.0, seed=seed)
        wall, cpu = time.perf_counter(), time.process_time()
        new = generate(model, ids, self.max_new_tokens, sampling=sampling, attention_mask=mask,
                       eos_token_id=tokenizer.eos_token_id).cpu()  # (batch, new)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        samples, generated = [], 0
        for prompt, row in zip(prompts, new.tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            generated += len(row)
            sample = {"prompt": prompt, "generated": row}
            body = len(row) - (row[-1] == tokenizer.eos_token_id)
            if body < self.min_new_tokens or _dedup_key(sample) in seen:
                continue
            seen.add(_dedup_key(sample))
            samples.append(sample)
        return {"index": index, "seed": seed, "samples": samples, "generated_tokens": generated,
                "seconds": wall, "cpu_seconds": cpu}

    def _prompt(self, tokenizer, generator: torch.Generator) -> list[int]:
        def pick(options):
            return options[int(torch.randint(len(options), (1,), generator=generator))]

        kind = self.prompts if self.prompts != "mixed" else pick(KINDS)
        if kind == "bos":
            return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _separator(tokenizer)]
        if kind == "chat" and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": pick(CHAT_REQUESTS)}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = pick(TEXT_OPENERS) if kind == "text" else pick(CHAT_REQUESTS)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def describe(self) -> dict:
        return {"source": self.name, "settings": asdict(self), **self.__dict__.get("_read", {}), "tokens": self.tokens_read()}


def _separator(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LeanLMError("teacher data needs a tokenizer with an EOS token (it ends and separates samples)")
    return tokenizer.eos_token_id


def _shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.json"


def _shard_stream(shard: dict, eos: int) -> list[int]:
    """A shard's samples as stream tokens: prompt + generation, EOS closing each sample once."""
    out: list[int] = []
    for sample in shard["samples"]:
        out += sample["prompt"] + sample["generated"]
        if not sample["generated"] or sample["generated"][-1] != eos:
            out.append(eos)
    return out


def _dedup_key(sample: dict) -> str:
    head = sample["prompt"] + [-1] + sample["generated"][:DEDUP_PREFIX]
    return hashlib.sha1(json.dumps(head).encode()).hexdigest()


def _speed(shards: list[dict]) -> dict:
    tokens = sum(s["generated_tokens"] for s in shards)
    wall, cpu = sum(s["seconds"] for s in shards), sum(s["cpu_seconds"] for s in shards)
    return {"generated_tokens": tokens, "seconds": wall, "cpu_seconds": cpu,
            "tokens_per_second": tokens / wall if wall else 0.0, "tokens_per_cpu_second": tokens / cpu if cpu else 0.0}


@contextlib.contextmanager
def _generation_lock(directory: Path):
    """An exclusive lock on the cache folder while shards are generated (POSIX ``flock``; none elsewhere)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, shards are still written atomically
        yield
        return
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is generating this teacher text (%s): waiting for it", directory)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id, tokenizer.bos_token_id]).encode()).hexdigest()[:20]


def model_fingerprint(source: str) -> str:
    """sha256 over the model's weight and config files (a hub id that is not on disk: the id itself)."""
    from leanlm.models.loading import resolve_source

    directory, gguf = resolve_source(source)
    path = Path(directory)
    if not path.exists():
        return f"hub:{source}"
    files = [path / gguf] if gguf else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(file.name.encode() + _file_sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:20]


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
