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
