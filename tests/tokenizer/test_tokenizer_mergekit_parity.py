"""Vocabulary merges through mergekit 0.1.5 and through mergelab give the same tokenizer and tensors.

Both tools run the same recipe on the tiny models of conftest.py (WordLevel
tokenizers whose vocabularies differ in order and content); the output
vocabularies must be identical (token -> id) and every tensor equal to float
rounding. Where MergeKit differs on purpose (rows past the tokenizer,
arcee-ai/mergekit#425) the test states the difference. Results are recorded in
docs/recipes.md, "Tokenizers and vocabularies".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergelab
from tok_kit import rows_by_token, write_llama, word_tokenizer, WORDS
from tok_family import family  # noqa: F401  (the fixture)

pytest.importorskip("mergekit", reason="mergekit 0.1.5 is the reference (pip install mergelab[bench])")
pytestmark = pytest.mark.mergekit


def _mergekit(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    conf = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(conf, str(out), options=MergeOptions(copy_tokenizer=True, quiet=True, random_seed=0))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _vocab(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def _both(text: str, tmp_path: Path) -> tuple[Path, Path]:
    _mergekit(text, tmp_path / "mergekit")
    mergelab.merge(text, tmp_path / "mergelab")
    return tmp_path / "mergekit", tmp_path / "mergelab"


def _models(fam, spec: dict[str, str]) -> str:
    return "".join(f"  - model: {fam[n][0]}\n" + (f"    parameters: {p}\n" if p else "") for n, p in spec.items())


RECIPES = {
    # <x> and <y> at swapped ids in b; the base's vocabulary
    "base_swapped_linear": ("merge_method: linear\nbase_model: {a}\ntokenizer_source: base\nmodels:\n",
                            {"a": "{weight: 0.3}", "b": "{weight: 0.7}"}),
    "union_linear": ("merge_method: linear\nbase_model: {a}\ntokenizer_source: union\nmodels:\n",
                     {"a": "{weight: 1.0}", "b": "{weight: 0.5}", "c": "{weight: 0.25}"}),
    "model_path_linear": ("merge_method: linear\ntokenizer_source: {c}\nmodels:\n",
                          {"a": "{weight: 0.5}", "b": "{weight: 0.2}", "c": "{weight: 0.3}"}),
    "union_task_arithmetic": ("merge_method: task_arithmetic\nbase_model: {a}\ntokenizer_source: union\nmodels:\n",
                              {"b": "{weight: 0.6}", "c": "{weight: 0.4}"}),
    "union_slerp": ("merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.3}}\ntokenizer_source: union\n"
                    "models:\n", {"a": "", "c": ""}),
    "tokens_and_padding": ("merge_method: linear\nbase_model: {a}\ntokenizer:\n  source: union\n"
                           "  pad_to_multiple_of: 8\n  tokens:\n    <x>:\n      source: {b}\n"
                           "    red:\n      source: {{kind: model_token, model: {b}, token: <y>}}\n"
                           "      force: true\n    <new>:\n      source: {{kind: zero}}\nmodels:\n",
                           {"a": "{weight: 1.0}", "b": "{weight: 1.0}", "c": "{weight: 1.0}"}),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_vocabulary_and_tensors_as_mergekit(family, tmp_path, name):
    head, models = RECIPES[name]
    text = head.format(**{n: family[n][0] for n in family}) + _models(family, models) + "dtype: float32\n"
    mk, ml = _both(text, tmp_path)
    vocab, ref = _vocab(ml), _vocab(family["c" if "tokenizer_source: {c}" in head else "a"][0])
    assert set(vocab) == set(_vocab(mk))
    # The reference's tokens keep their ids in both. MergeKit numbers the tokens a union adds in hash-map order,
    # which changes from run to run; mergelab in each model's id order. So rows are compared token by token.
    assert {t: vocab[t] for t in ref} == ref == {t: _vocab(mk)[t] for t in ref}
    assert json.loads((ml / "config.json").read_text())["vocab_size"] == \
        json.loads((mk / "config.json").read_text())["vocab_size"]
    got, want = _tensors(ml), _tensors(mk)
    assert set(got) == set(want)
    for key in want:
        g, w = got[key], want[key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert g.shape == w.shape
            g, w = rows_by_token(ml, g), rows_by_token(mk, w)
            g, w = torch.stack([g[t] for t in sorted(g)]), torch.stack([w[t] for t in sorted(g)])
            n = len(vocab)  # rows past the vocabulary (pad_to_multiple_of): compared by position
            g, w = torch.cat([g, got[key][n:]]), torch.cat([w, want[key][n:]])
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")


def test_tied_embeddings_get_no_stray_lm_head(tmp_path):
    """Tied models merged with a union vocabulary: neither tool writes an lm_head (cf. arcee-ai/mergekit#385)."""
    g = torch.Generator().manual_seed(0)
    a = write_llama(tmp_path / "a", torch.randn(17, 8, generator=g), seed=1, tied=True,
                    tok=word_tokenizer(WORDS, added=["<x>", "<y>"]))
    c = write_llama(tmp_path / "c", torch.randn(17, 8, generator=g), seed=2, tied=True,
                    tok=word_tokenizer(WORDS + ["blue"], added=["<z>"]))
    text = (f"merge_method: linear\nbase_model: {a}\ntokenizer_source: union\nmodels:\n  - model: {a}\n"
            f"    parameters: {{weight: 0.5}}\n  - model: {c}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    mk, ml = _both(text, tmp_path)
    got, want = _tensors(ml), _tensors(mk)
    assert "lm_head.weight" not in want and "lm_head.weight" not in got
    torch.testing.assert_close(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
    assert json.loads((ml / "config.json").read_text())["tie_word_embeddings"] is True


def test_rows_past_the_tokenizer_differ_from_mergekit_on_purpose(family, tmp_path):
    """Models with 3 padding rows past their 17-token tokenizer (as Qwen2.5 pads 151665 tokens to 152064 rows):
    MergeKit cuts the output to len(tokenizer) (arcee-ai/mergekit#425), mergelab keeps the rows and the
    config's vocab_size. The rows of the 17 tokens are the same in both."""
    paths = {}
    for n in "ab":
        folder, embed, head = family[n]
        extra = torch.randn(3, embed.shape[1], generator=torch.Generator().manual_seed(ord(n)))
        paths[n] = write_llama(tmp_path / n, torch.cat([embed, extra]), lm_head=torch.cat([head, extra]), seed=0)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(folder / f, paths[n] / f)
    text = (f"merge_method: linear\nbase_model: {paths['a']}\ntokenizer_source: base\nmodels:\n"
            f"  - model: {paths['a']}\n    parameters: {{weight: 0.5}}\n  - model: {paths['b']}\n"
            f"    parameters: {{weight: 0.5}}\ndtype: float32\n")
    mk, ml = _both(text, tmp_path)
    got, want = _tensors(ml)["model.embed_tokens.weight"], _tensors(mk)["model.embed_tokens.weight"]
    assert (want.shape[0], got.shape[0]) == (17, 20)
    assert json.loads((ml / "config.json").read_text())["vocab_size"] == 20
    assert json.loads((mk / "config.json").read_text())["vocab_size"] == 17
    torch.testing.assert_close(got[:17], want)


def test_chatml_renders_as_mergekits(family, tmp_path):
    """chat_template: chatml gives the same prompt text as MergeKit's built-in chatml template."""
    transformers = pytest.importorskip("transformers")
    text = (f"merge_method: linear\nchat_template: chatml\nmodels:\n  - model: {family['a'][0]}\n"
            f"    parameters: {{weight: 0.5}}\n  - model: {family['d'][0]}\n    parameters: {{weight: 0.5}}\n"
            "dtype: float32\n")
    mk, ml = _both(text, tmp_path)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    render = [transformers.AutoTokenizer.from_pretrained(str(p)).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True) for p in (mk, ml)]
    assert render[0] == render[1]


def test_bpe_union_matches_mergekit_and_keeps_the_base_encoding(tmp_path):
    """Byte-level BPE tokenizers trained on different texts, one with chat tokens added: the union has
    MergeKit's tokens and rows; text encodes as the base tokenizer encoded it, and the other model's
    added tokens encode as single tokens."""
    transformers = pytest.importorskip("transformers")
    from tok_kit import bpe_tokenizer

    corpus_a = ["the cat sat on the mat", "a dog ran far away", "the big red dog sat down"] * 4
    corpus_b = ["models merge weights", "the merged model runs", "weights of models and cats"] * 4
    toks = {"a": bpe_tokenizer(corpus_a, vocab_size=300),
            "b": bpe_tokenizer(corpus_b, vocab_size=300, added=["<|im_start|>", "<|im_end|>"])}
    g = torch.Generator().manual_seed(0)
    paths = {n: write_llama(tmp_path / n, torch.randn(t.get_vocab_size(), 8, generator=g), seed=i, tok=t)
             for i, (n, t) in enumerate(toks.items())}
    text = (f"merge_method: linear\nbase_model: {paths['a']}\ntokenizer_source: union\nmodels:\n"
            f"  - model: {paths['a']}\n    parameters: {{weight: 0.6}}\n  - model: {paths['b']}\n"
            f"    parameters: {{weight: 0.4}}\ndtype: float32\n")
    mk, ml = _both(text, tmp_path)
    assert set(_vocab(ml)) == set(_vocab(mk)) == set(_vocab(paths["a"])) | set(_vocab(paths["b"]))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        got, want = rows_by_token(ml, _tensors(ml)[key]), rows_by_token(mk, _tensors(mk)[key])
        assert set(got) == set(want)
        for t in want:
            torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-6)
    out = transformers.AutoTokenizer.from_pretrained(str(ml))
    base = transformers.AutoTokenizer.from_pretrained(str(paths["a"]))
    sample = "the red cat ran away from the models"
    assert out.convert_ids_to_tokens(out(sample)["input_ids"]) == base.convert_ids_to_tokens(base(sample)["input_ids"])
    ids = out("<|im_start|>the cat<|im_end|>", add_special_tokens=False)["input_ids"]
    vocab = out.get_vocab()
    assert ids[0] == vocab["<|im_start|>"] and ids[-1] == vocab["<|im_end|>"]
    assert out.decode(ids) == "<|im_start|>the cat<|im_end|>"
