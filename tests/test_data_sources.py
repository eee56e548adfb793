"""Data sources (wikitext, file, jsonl, teacher), mixes, the teacher cache, `--data` / `--text` on the CLI."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from leanlm import cli
from leanlm.data import calibration_batches, tokenize_split
from leanlm.data.sources import DataContext, DataMix, TeacherSource
from leanlm.data.sources import teacher as teacher_module
from leanlm.errors import LeanLMError

pytestmark = pytest.mark.real_model  # the bundled tokenizer (and WikiText-2 validation for `wikitext`)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "\nA second paragraph, with other words in it.\n"
TINY_TEACHER = "teacher:tokens=300:max_new_tokens=12:min_new_tokens=2:batch_size=4"


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text(TEXT.upper())
    lines = [json.dumps({"text": f"record {i}: " + TEXT[: 50 + 7 * i], "id": i}) for i in range(12)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")
    return tmp_path


@pytest.fixture
def teacher_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "teacher"


def specs(corpus) -> list[str]:
    return ["wikitext", f"file:{corpus / 'a.txt'}", f"file:{corpus}", f"file:{corpus}/**/*.md",
            f"jsonl:{corpus / 'data.jsonl'}:text", TINY_TEACHER, f"{TINY_TEACHER}@0.25,file:{corpus / 'a.txt'}@0.75"]


def test_every_source_gives_the_same_windows_for_the_same_seed(corpus, teacher_cache, real_tokenizer, tiny_model_dir):
    ctx = DataContext(real_tokenizer, str(tiny_model_dir))
    for spec in specs(corpus):
        first = DataMix.parse(spec).calibration(ctx, count=4, seq_len=16, seed=5)
        again = DataMix.parse(spec).calibration(ctx, count=4, seq_len=16, seed=5)  # a new mix: nothing memoised
        other = DataMix.parse(spec).calibration(ctx, count=4, seq_len=16, seed=6)
        assert first.shape == (4, 16) and torch.equal(first, again), spec
        assert not torch.equal(first, other), spec
        train = DataMix.parse(spec).training(ctx, seq_len=16)
        assert train.dim() == 2 and train.shape[1] == 16 and torch.equal(train, DataMix.parse(spec).training(ctx, 16))


def test_wikitext_default_is_the_old_calibration_draw(real_tokenizer):
    ids = tokenize_split(real_tokenizer, "validation")
    starts = torch.randint(0, len(ids) - 32, (6,), generator=torch.Generator().manual_seed(3))  # the old code, inline
    expected = torch.stack([ids[s : s + 32] for s in starts.tolist()])
    assert torch.equal(torch.cat(calibration_batches(real_tokenizer, 6, 32, 4, seed=3)), expected)
    mix = DataMix.parse(None)
    assert torch.equal(mix.training(DataContext(real_tokenizer), 64), ids[: len(ids) // 64 * 64].reshape(-1, 64))
    record = mix.describe()["sources"][0]
    assert record["path"].endswith("wiki.valid.raw") and record["tokens"] == len(ids) and len(record["sha256"]) == 64


def test_file_sources_read_what_they_say(corpus, real_tokenizer):
    ctx = DataContext(real_tokenizer)
    one = DataMix.parse(f"file:{corpus / 'a.txt'}")
    ids = one.training(ctx, 8).flatten()
    expected = real_tokenizer(TEXT.strip("\n"), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected[: len(ids)]
    record = one.describe()["sources"][0]
    assert record["sha256"] == hashlib.sha256(TEXT.strip("\n").encode()).hexdigest() and record["files"] == 1
    folder = DataMix.parse(str(corpus))  # an existing path alone is a file source: a.txt, data.jsonl, sub/b.md
    folder.training(ctx, 8)
    assert folder.describe()["sources"][0]["files"] == 3
    jsonl = DataMix.parse(f"jsonl:{corpus / 'data.jsonl'}")  # field defaults to text
    jsonl.training(ctx, 8)
    assert jsonl.describe()["sources"][0]["records"] == 12


def test_labels_are_specs_that_parse_back(corpus):
    for spec in [*specs(corpus), "hf:wikitext:wikitext-2-raw-v1:validation:text", "hf:org/name:train:body"]:
        mix = DataMix.parse(spec)
        assert DataMix.parse(mix.label()).parts == mix.parts, spec


def test_mix_shares_follow_the_weights(corpus, real_tokenizer):
    ctx = DataContext(real_tokenizer)
    a, b = f"file:{corpus / 'a.txt'}", f"jsonl:{corpus / 'data.jsonl'}:text"
    mix = DataMix.parse(f"{a}@3,{b}@1")
    assert mix.weights == [0.75, 0.25]
    calib = mix.calibration(ctx, count=8, seq_len=8, seed=0)
    assert mix.used["windows"] == [6, 2]
    assert torch.equal(calib[:6], DataMix.parse(a).calibration(ctx, 6, 8, seed=0))  # part i drawn with seed + i
    assert torch.equal(calib[6:], DataMix.parse(b).calibration(ctx, 2, 8, seed=1))
    train = mix.training(ctx, seq_len=8)
    n_a, n_b = mix.used["windows"]
    available = len(DataMix.parse(a).training(ctx, 8)), len(DataMix.parse(b).training(ctx, 8))
    total = int(min(available[0] / 0.75, available[1] / 0.25))  # the scarcer source (for its weight) sets the total
    assert n_a + n_b == total == len(train) and n_a <= available[0] and n_b <= available[1]  # nothing repeated
    assert abs(n_a - 3 * n_b) <= 3
    assert torch.equal(train[:n_a], DataMix.parse(a).training(ctx, 8)[:n_a])
    assert torch.equal(train[n_a:], DataMix.parse(b).training(ctx, 8)[:n_b])


def _count_shards(monkeypatch) -> list[int]:
    made: list[int] = []
    original = TeacherSource._generate_shard

    def counting(self, model, tokenizer, index, seen):
        made.append(index)
        return original(self, model, tokenizer, index, seen)

    monkeypatch.setattr(TeacherSource, "_generate_shard", counting)
    return made


def test_teacher_cache_is_reused_and_invalidated_by_a_setting(teacher_cache, monkeypatch, real_tokenizer, tiny_model_dir):
    ctx = DataContext(real_tokenizer, str(tiny_model_dir))
    made = _count_shards(monkeypatch)
    first = DataMix.parse(TINY_TEACHER).training(ctx, 16)
    assert made and sorted(made) == list(range(len(made)))
    generated = len(made)
    again = DataMix.parse(TINY_TEACHER).training(ctx, 16)  # read back: no shard generated
    assert torch.equal(first, again) and len(made) == generated
    key = TeacherSource(tokens=300, max_new_tokens=12, min_new_tokens=2, batch_size=4).cache_key(ctx)
    assert [p.name for p in teacher_cache.iterdir()] == [key]
    more = DataMix.parse(TINY_TEACHER.replace("tokens=300", "tokens=600")).training(ctx, 16)  # same cache, extended
    assert torch.equal(more[: len(first)], first) and len(made) > generated and len(list(teacher_cache.iterdir())) == 1
    for changed in ("seed=1", "temperature=0.7", "top_k=5"):
        other = DataMix.parse(f"{TINY_TEACHER}:{changed}").training(ctx, 16)
        assert not torch.equal(other[: len(first)], first), changed
    assert len(list(teacher_cache.iterdir())) == 4  # one cache per distinct setting


def test_interrupted_teacher_generation_resumes_from_its_shards(tmp_path, monkeypatch, real_tokenizer, tiny_model_dir):
    ctx = DataContext(real_tokenizer, str(tiny_model_dir))
    spec = TINY_TEACHER.replace("tokens=300", "tokens=500")
    monkeypatch.setenv("LEANLM_CACHE_DIR", str(tmp_path / "whole"))
    whole = DataMix.parse(spec).training(ctx, 8)

    monkeypatch.setenv("LEANLM_CACHE_DIR", str(tmp_path / "cut"))
    original, calls = TeacherSource._generate_shard, []

    def dies_after_two(self, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C looks like mid-generation
        calls.append(args[2])
        return original(self, *args)

    monkeypatch.setattr(TeacherSource, "_generate_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        DataMix.parse(spec).training(ctx, 8)
    cache = next((tmp_path / "cut" / "teacher").iterdir())
    assert sorted(p.name for p in cache.glob("shard-*.json")) == ["shard-00000.json", "shard-00001.json"]
    assert not list(cache.glob(".*tmp"))  # atomic writes: no half-written shard
    made = _count_shards(monkeypatch)
    monkeypatch.setattr(TeacherSource, "_generate_shard", lambda self, *a: (made.append(a[2]), original(self, *a))[1])
    resumed = DataMix.parse(spec).training(ctx, 8)
    assert made and min(made) == 2  # shards 0 and 1 were read back, not generated again
    assert torch.equal(resumed, whole)  # exactly what an uninterrupted generation gives


def test_teacher_samples_are_bounded_and_deduplicated(teacher_cache, real_tokenizer, tiny_model_dir):
    ctx = DataContext(real_tokenizer, str(tiny_model_dir))
    source = TeacherSource(tokens=200, max_new_tokens=10, min_new_tokens=3, batch_size=4)
    source.stream(ctx)
    shards = [json.loads(p.read_text()) for p in sorted(source.cache_dir(ctx).glob("shard-*.json"))]
    samples = [s for shard in shards for s in shard["samples"]]
    assert samples and all(3 <= len(s["generated"]) <= 10 for s in samples)
    keys = [teacher_module._dedup_key(s) for s in samples]
    assert len(keys) == len(set(keys))
    record = source.describe()
    assert record["tokens"] == 200 and record["generation"]["generated_tokens"] > 0


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def bad_inputs(tmp_path) -> dict[str, tuple[str, str]]:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "short.txt").write_text("only a few words")
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "x"}\nnot json\n')
    return {
        "missing file": (f"file:{tmp_path / 'nope.txt'}", "does not exist"),
        "empty file": (f"file:{tmp_path / 'empty.txt'}", "holds no text"),
        "binary file": (f"file:{tmp_path / 'binary.bin'}", "looks binary"),
        "not UTF-8": (f"file:{tmp_path / 'latin1.txt'}", "is not UTF-8 text"),
        "missing field": (f"jsonl:{tmp_path / 'rows.jsonl'}:text", "line 1 has no field 'text'"),
        "bad JSON": (f"jsonl:{tmp_path / 'broken.jsonl'}:text", "line 2 is not valid JSON"),
        "too short": (f"file:{tmp_path / 'short.txt'}", "fewer than one window of 256"),
        "unknown source": ("vibes", "unknown data source 'vibes'"),
        "bad setting": ("teacher:temperature=hot", "should be a number"),
        "test split": ("wikitext:split=test", "validation split only"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "binary file", "not UTF-8", "missing field", "bad JSON",
                                  "too short", "unknown source", "bad setting", "test split"])
def test_bad_data_is_one_sentence_and_exit_2(case, capsys, tmp_path, tiny_model_dir):
    spec, fragment = bad_inputs(tmp_path)[case]
    code, _, err = run_cli(capsys, "data", "--model", tiny_model_dir, "--data", spec, "--seq-len", "256")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


def test_bad_data_stops_analyze_prune_distill_before_any_work(capsys, tmp_path, tiny_model_dir):
    missing = f"file:{tmp_path / 'nope.txt'}"
    for argv in (["analyze", "--model", tiny_model_dir, "--out", tmp_path / "a"],
                 ["prune", "--model", tiny_model_dir, "--out", tmp_path / "p"],
                 ["distill", "--student", tiny_model_dir, "--teacher", tiny_model_dir, "--out", tmp_path / "d"]):
        code, _, err = run_cli(capsys, *argv, "--data", missing)
        assert code == 2 and err.count("\n") == 1 and "does not exist" in err, err
    assert not any((tmp_path / name).exists() for name in "apd")


def test_eval_text_records_file_sha256_and_tokens(capsys, tmp_path, tiny_model_dir, real_tokenizer):
    text = tmp_path / "notes.txt"
    text.write_text(TEXT * 2)
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--text", text, "--out", out, "--no-speed",
                                "--window", "64", "--stride", "32", "--max-tokens", "200")
    assert code == 0, err
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    assert protocol["text"]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert protocol["text"]["name"] == "notes.txt" and protocol["split"] is None
    assert protocol["text"]["tokens"] == len(real_tokenizer(TEXT * 2, add_special_tokens=False)["input_ids"])
    assert protocol["tokens_scored"] == 199 and protocol["data"] == protocol["text"]
    code, _, err = run_cli(capsys, "eval", "--model", tiny_model_dir, "--text", tmp_path / "nope.txt", "--no-speed")
    assert code == 2 and err.count("\n") == 1 and "neither a file nor a built-in text" in err


def test_builtin_pride_and_prejudice(tiny_model_dir):
    from leanlm.data.austen import TEXT_SHA256
    from leanlm.data.texts import eval_text

    text, record = eval_text("pride")  # fetched once from the Debian archive (network), then cached
    assert text.startswith("PRIDE AND PREJUDICE") and "It is a truth universally acknowledged" in text[:400]
    assert record["sha256"] == TEXT_SHA256


def test_recipe_data_settings(corpus):
    from leanlm.recipe import parse_recipe

    recipe = parse_recipe({"name": "r", "data": f"teacher@0.5,file:{corpus / 'a.txt'}@0.5",
                           "recover": {"data": [{"source": "teacher", "tokens": 1000, "weight": 2}, "wikitext"]},
                           "eval": {"texts": ["botchan", str(corpus / "a.txt")]}})
    assert DataMix.parse(recipe.recover.data).weights == pytest.approx([2 / 3, 1 / 3])
    assert parse_recipe(recipe.to_dict()) == recipe
    assert "data" not in parse_recipe({"name": "plain"}).to_dict()  # defaults left out: older runs still resume
    with pytest.raises(LeanLMError) as err:
        parse_recipe({"name": "bad", "data": "file:/no/such", "recover": {"data": [{"source": "teacher", "tokens": "x"}]},
                      "eval": {"texts": ["nope.txt"]}})
    message = str(err.value)
    assert "3 problem(s)" in message and "does not exist" in message and "tokens" in message and "nope.txt" in message


def test_recipe_runs_on_its_data_and_scores_its_texts(tmp_path, corpus, teacher_cache, tiny_model_dir):
    notes = corpus / "a.txt"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: tiny-data
model: {tiny_model_dir}
dtype: float32
device: cpu
data: file:{notes}
eval: {{method: nonoverlap, window: 64, max_tokens: 200, speed: false, ood: false, texts: ["{notes}"]}}
calibration: {{samples: 2, seq_len: 16}}
transforms: [{{name: prune_heads, fraction: 0.25, scorer: taylor}}]
recover:
  data: {TINY_TEACHER}
  distill: {{steps: 2, max_minutes: null, batch_size: 2, seq_len: 16, checkpoint_every: 0, eval_every: 0}}
""")
    out = tmp_path / "run"
    assert cli.main(["run", str(recipe), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    calibration = results["transforms"][0]["record"]["data"]
    assert calibration["spec"] == f"file:{notes}" and calibration["sources"][0]["windows"] == 2
    assert results["training"]["lora_kd"]["data"] == DataMix.parse(TINY_TEACHER).label()
    scored = {s: results[s]["texts"][str(notes)] for s in ("baseline", "recovered")}
    assert scored["baseline"]["protocol"]["text"]["sha256"] == hashlib.sha256(notes.read_bytes()).hexdigest()
    assert scored["baseline"]["perplexity"] != scored["recovered"]["perplexity"]
    report = (out / "report.md").read_text()
    assert f"ppl ({notes})" in report and "training data: `teacher:" in report
