"""Embedding and lm_head rows are merged token by token; each case checked against a hand computation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mergelab
from mergelab.errors import RecipeError, ShapeMismatch
from tok_kit import rows_by_token
from tok_family import family  # noqa: F401  (the fixture)

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _linear(fam, names, weights, **extra):
    rec = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(fam[n][0]), "parameters": {"weight": w}} for n, w in zip(names, weights)]}
    return {**rec, **extra}


def _out(folder):
    return load_file(str(folder / "model.safetensors"))


def _by_token(fam, name, which):
    folder, embed, head = fam[name]
    return rows_by_token(folder, embed if which == EMB else head)


@pytest.mark.parametrize("source", ["base", None])
def test_swapped_tokens_are_averaged_by_token(family, tmp_path, source):
    """a and b hold the same tokens, <x> and <y> at swapped ids: each output row is 0.3 a[t] + 0.7 b[t]."""
    extra = {"base_model": str(family["a"][0]), **({"tokenizer_source": source} if source else {})}
    report = mergelab.merge(_linear(family, "ab", [0.3, 0.7], **extra), tmp_path / "out")
    got = _out(tmp_path / "out")
    for which in (EMB, HEAD):
        a, b = _by_token(family, "a", which), _by_token(family, "b", which)
        out = rows_by_token(tmp_path / "out", got[which])
        assert set(out) == set(a)
        for t in out:
            torch.testing.assert_close(out[t], 0.3 * a[t] + 0.7 * b[t])
        # the ids really differ: averaged by index, <x> would have mixed a's <x> with b's <y>
        assert not torch.allclose(out["<x>"], 0.3 * a["<x>"] + 0.7 * family["b"][1 if which == EMB else 2][15])
    notes = dict(report.copied)
    assert "rows matched by token" in notes[EMB]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (family["a"][0] / "tokenizer.json").read_bytes()


def test_same_vocabularies_merge_by_index_unchanged(family, tmp_path):
    report = mergelab.merge(_linear(family, "ad", [0.5, 0.5]), tmp_path / "out")
    got = _out(tmp_path / "out")
    torch.testing.assert_close(got[EMB], 0.5 * family["a"][1] + 0.5 * family["d"][1])
    assert EMB not in dict(report.copied)  # nothing to match: no note


def test_model_without_tokenizer(family, tmp_path):
    """Same row count: taken as the reference's tokens (MergeKit's assumption), said in the report;
    another row count: refused, since nothing says which row is which token."""
    report = mergelab.merge(_linear(family, ["a", "nt"], [0.5, 0.5], tokenizer_source="base",
                                    base_model=str(family["a"][0])), tmp_path / "out")
    torch.testing.assert_close(_out(tmp_path / "out")[EMB], 0.5 * family["a"][1] + 0.5 * family["nt"][1])
    assert "no tokenizer files" in dict(report.copied)[EMB]
    with pytest.raises(ShapeMismatch, match="cannot tell which row is which token"):
        mergelab.merge(_linear(family, ["c", "nt"], [0.5, 0.5], tokenizer_source="base",
                               base_model=str(family["c"][0])), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_different_sizes_without_tokenizer_source_are_refused_with_advice(family, tmp_path):
    with pytest.raises(ShapeMismatch, match="tokenizer_source: base.*tokenizer_source: union"):
        mergelab.merge(_linear(family, "ac", [0.5, 0.5]), tmp_path / "out")


def test_vocab_mismatch_resize_with_tokenizers_matches_by_token(family, tmp_path):
    """a (17 tokens) and c (19, lacks <x>), no tokenizer_source, `vocab_mismatch: resize`: a's vocabulary,
    rows by token: shared t -> (a[t] + c[t]) / 2; <x> (a only) -> a[<x>]; c's blue/green dropped."""
    mergelab.merge(_linear(family, "ac", [1.0, 1.0], base_model=str(family["a"][0]), vocab_mismatch="resize"),
                   tmp_path / "out")
    got = _out(tmp_path / "out")[EMB]
    a, c = _by_token(family, "a", EMB), _by_token(family, "c", EMB)
    out = rows_by_token(tmp_path / "out", got)
    assert got.shape[0] == 17 and set(out) == set(a)
    torch.testing.assert_close(out["<y>"], (a["<y>"] + c["<y>"]) / 2)
    torch.testing.assert_close(out["<x>"], a["<x>"])


def test_union_fills_as_mergekit_and_encodes_the_union(family, tmp_path):
    """Linear over a (base), b, c with equal weights (each 1/3 after normalising).

    shared token t:        (a[t] + b[t] + c[t]) / 3
    <x> (a, b; c lacks):   c takes the base's row: (2 a[<x>] + b[<x>]) / 3
    blue, <z> (c only):    every model takes c's row: c[t]
    """
    transformers = pytest.importorskip("transformers")
    rec = _linear(family, "abc", [1.0, 1.0, 1.0], base_model=str(family["a"][0]), tokenizer_source="union")
    mergelab.merge(rec, tmp_path / "out")
    got = _out(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 20 == got[EMB].shape[0]
    for which in (EMB, HEAD):
        a, b, c = (_by_token(family, n, which) for n in "abc")
        out = rows_by_token(tmp_path / "out", got[which])
        assert set(out) == set(a) | set(c)
        for t in ("cat", "<y>", "<unk>"):
            torch.testing.assert_close(out[t], (a[t] + b[t] + c[t]) / 3)
        torch.testing.assert_close(out["<x>"], (2 * a["<x>"] + b["<x>"]) / 3)
        for t in ("blue", "<z>"):
            torch.testing.assert_close(out[t], c[t])
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    vocab = tok.get_vocab()
    ids = tok("the blue cat <z> <x>", add_special_tokens=False)["input_ids"]
    assert ids == [vocab["the"], vocab["blue"], vocab["cat"], vocab["<z>"], vocab["<x>"]]
    assert vocab["<z>"] >= 17 and vocab["the"] == read_a_vocab(family)["the"]  # a's ids kept, c's added after


def read_a_vocab(family):
    from mergelab.tokenizer.vocab import read_vocabulary

    return read_vocabulary(family["a"][0])


def test_tokens_sources_force_and_pad_to_multiple_of(family, tmp_path):
    """`tokens:` sources override MergeKit's automatic fill; linear weights 1/3 each over a (base), b, c:

      <x>: {source: b}          c lacks <x> and takes b's row: (a[<x>] + 2 b[<x>]) / 3
      red: model_token b <y>, force: every model takes b[<y>]: b[<y>]
      <new>: {kind: zero}       in no model: 0
      rows 21..23 (pad to 8):   each model's mean row; their mean is the mean of the merged rows 0..20
    """
    pytest.importorskip("transformers")
    b_path = str(family["b"][0])
    tokenizer = {"source": "union", "pad_to_multiple_of": 8,
                 "tokens": {"<x>": {"source": b_path},
                            "red": {"source": {"kind": "model_token", "model": b_path, "token": "<y>"}, "force": True},
                            "<new>": {"source": {"kind": "zero"}}}}
    rec = _linear(family, "abc", [1.0, 1.0, 1.0], base_model=str(family["a"][0]), tokenizer=tokenizer)
    mergelab.merge(rec, tmp_path / "out")
    got = _out(tmp_path / "out")
    assert got[EMB].shape[0] == 24
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 24
    a, b = _by_token(family, "a", EMB), _by_token(family, "b", EMB)
    out = rows_by_token(tmp_path / "out", got[EMB])
    torch.testing.assert_close(out["<x>"], (a["<x>"] + 2 * b["<x>"]) / 3)
    torch.testing.assert_close(out["red"], b["<y>"])
    assert torch.equal(out["<new>"], torch.zeros(8)) and len(out) == 21
    torch.testing.assert_close(got[EMB][21:], got[EMB][:21].mean(0).expand(3, -1))


def test_token_source_errors_are_reported_before_work(family, tmp_path):
    bad = {"source": "base", "tokens": {"blue": {"source": str(family["b"][0])}}}
    with pytest.raises(RecipeError, match=r"has no token 'blue'"):
        mergelab.merge(_linear(family, "ab", [1, 1], base_model=str(family["a"][0]), tokenizer=bad), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_padding_rows_past_the_tokenizer_are_kept(family, tmp_path):
    """a's tokenizer has 17 tokens; copies with 3 extra (padding) rows keep them: vocab_size stays 20
    (MergeKit cuts them to len(tokenizer), arcee-ai/mergekit#425), merged by index."""
    from tok_kit import write_llama

    pads = {}
    for n in "ab":
        folder, embed, head = family[n]
        extra = torch.randn(3, embed.shape[1], generator=torch.Generator().manual_seed(ord(n)))
        e = torch.cat([embed, extra])
        pads[n] = (write_llama(tmp_path / n, e, lm_head=torch.cat([head, extra]), seed=0), e)
        shutil.copy(folder / "tokenizer.json", tmp_path / n / "tokenizer.json")
        shutil.copy(folder / "tokenizer_config.json", tmp_path / n / "tokenizer_config.json")
    fam = {n: (p, e, None) for n, (p, e) in pads.items()}
    mergelab.merge(_linear(fam, "ab", [0.5, 0.5], base_model=str(pads["a"][0]), tokenizer_source="base"),
                   tmp_path / "out")
    got = _out(tmp_path / "out")[EMB]
    assert got.shape[0] == 20
    torch.testing.assert_close(got[17:], 0.5 * pads["a"][1][17:] + 0.5 * pads["b"][1][17:])
    a, b = rows_by_token(pads["a"][0], pads["a"][1]), rows_by_token(pads["b"][0], pads["b"][1])
    torch.testing.assert_close(rows_by_token(tmp_path / "out", got)["<x>"], 0.5 * a["<x>"] + 0.5 * b["<x>"])


def test_gpt2_wte_rows_matched_by_token(tmp_path):
    """GPT-2 (tied wte, no lm_head tensor): two added tokens swapped, union with a third word list."""
    from tok_kit import WORDS, word_tokenizer, write_gpt2

    g = torch.Generator().manual_seed(3)
    toks = {"a": word_tokenizer(WORDS, added=["<x>", "<y>"]), "b": word_tokenizer(WORDS, added=["<y>", "<x>"])}
    paths = {n: write_gpt2(tmp_path / n, torch.randn(17, 8, generator=g), seed=i, tok=t)
             for i, (n, t) in enumerate(toks.items())}
    rec = {"merge_method": "linear", "dtype": "float32", "base_model": str(paths["a"]), "tokenizer_source": "base",
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths.values(), (0.25, 0.75))]}
    mergelab.merge(rec, tmp_path / "out")
    got = _out(tmp_path / "out")
    assert "lm_head.weight" not in got
    rows = {n: rows_by_token(p, load_file(str(p / "model.safetensors"))["transformer.wte.weight"])
            for n, p in paths.items()}
    out = rows_by_token(tmp_path / "out", got["transformer.wte.weight"])
    for t in ("<x>", "<y>", "cat"):
        torch.testing.assert_close(out[t], 0.25 * rows["a"][t] + 0.75 * rows["b"][t])
