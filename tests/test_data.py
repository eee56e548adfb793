import pytest
import torch

from leanlm.data import (
    calibration_batches,
    nonoverlapping_windows,
    sentence_chunks,
    sliding_windows,
    split_sentences,
    tokenize_split,
    wikitext_lines,
    wikitext_text,
)
from leanlm.data import wikitext as wikitext_module
from leanlm.errors import LeanLMError


@pytest.fixture
def fresh_cache():
    wikitext_module.wikitext_lines.cache_clear()
    yield
    wikitext_module.wikitext_lines.cache_clear()


@pytest.mark.parametrize("num_tokens,window,stride", [(100, 16, 8), (100, 16, 16), (17, 16, 5), (5, 16, 8), (1000, 64, 1), (1000, 64, 63)])
def test_sliding_windows_score_every_prediction_once(num_tokens, window, stride):
    windows = sliding_windows(num_tokens, window, stride)
    scored = []
    for win in windows:
        assert win.end - win.start <= window
        scored += list(range(win.end - win.scored, win.end))  # positions of the scored target tokens
    if stride < window:
        assert scored == list(range(1, num_tokens))
    else:  # like HF: a window's first token has no context and is skipped (the last window may reach back)
        assert scored == sorted(set(scored))
        assert {t for t in range(1, num_tokens) if t not in scored} <= set(range(0, num_tokens, window))
    for win in windows[1:]:
        # each later window scores only what the previous did not, with the rest as context
        assert win.scored <= stride and (win.end - win.scored) - win.start >= window - stride


def test_nonoverlapping_windows_drop_the_tail():
    windows = nonoverlapping_windows(1000, 128)
    assert len(windows) == 7
    assert [(w.start, w.end) for w in windows[:2]] == [(0, 128), (128, 256)]
    assert all(w.scored == 127 for w in windows)
    with pytest.raises(LeanLMError):
        nonoverlapping_windows(100, 128)


def test_bad_window_arguments():
    with pytest.raises(LeanLMError):
        sliding_windows(100, 16, 0)
    with pytest.raises(LeanLMError):
        sliding_windows(100, 16, 17)


def test_split_sentences_keeps_all_words_in_order():
    text = " = Title = \n First sentence. Second one!  Third? Yes\n\n last line"
    pieces = split_sentences(text)
    assert pieces == [" = Title = ", "\n First sentence.", " Second one!", "  Third?", " Yes", "\n\n last line"]
    assert "".join(pieces) == text  # nothing lost: whitespace travels with the next sentence


def test_sentence_chunks_cover_every_token_once_and_respect_the_limit():
    sentences = [list(range(i * 100, i * 100 + n)) for i, n in enumerate([10, 30, 30, 70, 5, 64, 1])]
    chunks = sentence_chunks(sentences, max_tokens=64)
    assert [t for chunk in chunks for t in chunk] == [t for s in sentences for t in s]
    assert all(1 <= len(chunk) <= 64 for chunk in chunks)
    # whole sentences stay together when they fit: [10+30], [30], [64 of the 70], [6 + 5], [64], [1]
    assert [len(c) for c in chunks] == [40, 30, 64, 11, 64, 1]
    assert sentence_chunks(sentences, 64) == chunks  # deterministic


def test_wikitext_rows_match_the_hf_layout():
    lines = wikitext_lines("test")
    assert len(lines) == 4358
    assert lines[0] == "" and lines[1] == " = Robert Boulter = \n"
    assert wikitext_text("test", "paper").startswith("\n\n = Robert Boulter = \n\n\n")
    assert len(wikitext_text("test").encode()) == 1_290_590  # the raw file, byte for byte


def test_data_dir_setting_takes_precedence(tmp_path, monkeypatch, fresh_cache):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(" \n = Mine = \n")
    monkeypatch.setenv("LEANLM_DATA_DIR", str(tmp_path))
    assert wikitext_lines("test") == ("", " = Mine = \n")


def test_missing_data_names_all_three_places(tmp_path, monkeypatch, fresh_cache):
    monkeypatch.setattr(wikitext_module, "_candidate_dirs", lambda: [tmp_path])
    monkeypatch.setattr(wikitext_module, "_lines_from_hub", lambda split: None)
    with pytest.raises(LeanLMError) as err:
        wikitext_lines("validation")
    message = str(err.value)
    assert "LEANLM_DATA_DIR" in message and "../shared/data" in message and "datasets" in message


def test_unknown_split():
    with pytest.raises(LeanLMError, match="unknown WikiText-2 split"):
        wikitext_lines("train")


@pytest.mark.real_model
def test_calibration_draws_from_validation_only(real_tokenizer):
    batches = calibration_batches(real_tokenizer, num_samples=6, seq_len=32, batch_size=4, seed=3)
    assert [b.shape for b in batches] == [torch.Size([4, 32]), torch.Size([2, 32])]
    valid = tokenize_split(real_tokenizer, "validation").tolist()
    test = tokenize_split(real_tokenizer, "test").tolist()
    text_valid, text_test = " ".join(map(str, valid)), " ".join(map(str, test))
    for row in torch.cat(batches).tolist():
        window = " ".join(map(str, row))
        assert window in text_valid and window not in text_test
    assert torch.equal(torch.cat(batches), torch.cat(calibration_batches(real_tokenizer, 6, 32, 4, seed=3)))


@pytest.mark.real_model
def test_real_split_token_counts(real_tokenizer):
    assert len(tokenize_split(real_tokenizer, "test")) == 303_415
