"""read_vocabulary gives what the tokenizers library and transformers give, from each kind of tokenizer file."""

from __future__ import annotations

import json

import pytest

from mergelab.errors import CheckpointError
from mergelab.tokenizer.vocab import read_vocabulary
from tok_kit import WORDS, bpe_tokenizer, save_tokenizer, word_tokenizer

CORPUS = ["the cat sat on the mat", "a dog ran far away", "the big red dog sat", "cats and dogs and mats"] * 3


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_tokenizer_json_matches_tokenizers_and_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    tok = word_tokenizer(WORDS, added=["<x>"]) if kind == "wordlevel" else bpe_tokenizer(CORPUS, added=["<|im_start|>"])
    save_tokenizer(tok, tmp_path)
    got = read_vocabulary(tmp_path)
    assert got == tok.get_vocab(with_added_tokens=True)
    assert got == transformers.AutoTokenizer.from_pretrained(str(tmp_path)).get_vocab()


def test_vocab_json_with_added_tokens_and_vocab_txt(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "j" / "added_tokens.json").write_text(json.dumps({"<x>": 2}))
    assert read_vocabulary(tmp_path / "j") == {"a": 0, "b": 1, "<x>": 2}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n##s\n")
    assert read_vocabulary(tmp_path / "t") == {"[PAD]": 0, "[UNK]": 1, "hello": 2, "##s": 3}
    assert read_vocabulary(tmp_path) is None  # no tokenizer files
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"model": {"type": "X"}}))
    with pytest.raises(CheckpointError, match="no vocabulary"):
        read_vocabulary(tmp_path / "bad")


def test_vocabulary_is_read_once_per_file_version(tmp_path, monkeypatch):
    """A search plans many candidates over one folder: the files are parsed once, and again when they change."""
    import os

    from mergelab.tokenizer import vocab as vocab_module

    calls = []
    real = vocab_module._read_vocabulary
    monkeypatch.setattr(vocab_module, "_read_vocabulary", lambda folder: calls.append(folder) or real(folder))
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"a": 0, "b": 1}))
    first = read_vocabulary(tmp_path)
    first["mutated"] = 9  # the caller's copy, not the cache's
    assert read_vocabulary(tmp_path) == {"a": 0, "b": 1} and len(calls) == 1
    replacement = tmp_path / "new.json"
    replacement.write_text(json.dumps({"a": 1, "b": 0}))
    os.replace(replacement, path)  # a new file under the same name
    assert read_vocabulary(tmp_path) == {"a": 1, "b": 0} and len(calls) == 2
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<x>": 2}))  # a file the vocabulary also reads
    assert read_vocabulary(tmp_path) == {"a": 1, "b": 0, "<x>": 2} and len(calls) == 3


def test_vocabulary_id_is_equal_exactly_for_equal_vocabularies(tmp_path):
    """Planning compares ids, not dicts: equal contents in other folders share one id, any change gives another."""
    import os

    from mergelab.tokenizer.vocab import vocabulary_id

    for name, vocab in {"a": {"x": 0, "y": 1}, "b": {"x": 0, "y": 1}, "c": {"x": 1, "y": 0}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "none").mkdir()
    ids = {name: vocabulary_id(tmp_path / name) for name in "abc"}
    assert ids["a"] == ids["b"] != ids["c"] and vocabulary_id(tmp_path / "none") is None
    assert vocabulary_id(tmp_path / "a") == ids["a"]  # stable while the files are
    replacement = tmp_path / "new.json"
    replacement.write_text(json.dumps({"x": 1, "y": 0}))
    os.replace(replacement, tmp_path / "b" / "vocab.json")
    assert vocabulary_id(tmp_path / "b") == ids["c"] != ids["a"]


def test_vocabulary_ids_are_not_reused_after_the_cache_evicts(tmp_path, monkeypatch):
    """Ids taken in one plan stay distinct for distinct contents even when reading evicts earlier folders."""
    from mergelab.tokenizer import vocab as vocab_module

    monkeypatch.setattr(vocab_module, "_CACHE", {})
    monkeypatch.setattr(vocab_module, "_CACHE_SIZE", 1)  # every read evicts the one before
    ids = []
    for i in range(4):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "vocab.json").write_text(json.dumps({"x": 0, f"tok{i}": 1}))
        ids.append(vocab_module.vocabulary_id(tmp_path / str(i)))
    assert len(set(ids)) == 4
