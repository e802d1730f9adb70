"""The `family` fixture of tests/tokenizer (imported by its test files; a conftest.py here would shadow tests/conftest.py for `from conftest import`): tiny Llamas with WordLevel tokenizers whose vocabularies differ."""

from __future__ import annotations

import pytest
import torch


from tok_kit import SPECIAL, WORDS, word_tokenizer, write_llama  # noqa: E402

H = 8


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """a: WORDS + <x>, <y>; b: the same tokens with <x> and <y> swapped; c: WORDS + blue, green + <z>, <y>;
    d: a's tokenizer; nt: a's rows without tokenizer files. Returns name -> (folder, embed, lm_head)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("tokfam")
    g = torch.Generator().manual_seed(0)
    n = len(SPECIAL) + len(WORDS) + 2
    toks = {"a": word_tokenizer(WORDS, added=["<x>", "<y>"]),
            "b": word_tokenizer(WORDS, added=["<y>", "<x>"]),
            "c": word_tokenizer(WORDS + ["blue", "green"], added=["<z>", "<y>"]),
            "d": word_tokenizer(WORDS, added=["<x>", "<y>"]),
            "nt": None}
    out = {}
    for i, (name, tok) in enumerate(toks.items()):
        rows = n + 2 if name == "c" else n
        embed, head = torch.randn(rows, H, generator=g), torch.randn(rows, H, generator=g)
        out[name] = (write_llama(root / name, embed, lm_head=head, seed=i, tok=tok), embed, head)
    return out
