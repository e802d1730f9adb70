"""Tiny models with real tokenizers, made by the tests (no network): WordLevel and BPE tokenizers
from the `tokenizers` library, Llama- and GPT-2-shaped checkpoints whose embedding rows follow them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "big", "red"]
SPECIAL = ["<unk>", "<s>", "</s>"]


def word_tokenizer(words: list[str], added: list[str] = (), special: list[str] = SPECIAL):
    """A WordLevel tokenizer: ids 0.. for `special` + `words` in order, then `added` as added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*special, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in special])
    if added:
        tok.add_tokens([AddedToken(a, special=True) for a in added])
    return tok


def bpe_tokenizer(corpus: list[str], vocab_size: int = 60, added: list[str] = ()):
    """A byte-level BPE tokenizer trained on `corpus` (deterministic), `added` as added special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if added:
        tok.add_tokens([AddedToken(a, special=True) for a in added])
    return tok


def save_tokenizer(tok, folder: Path, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_llama(folder: Path, embed: torch.Tensor, *, seed: int, lm_head: torch.Tensor | None = None,
                layers: int = 2, tok=None, tied: bool = False) -> Path:
    """A tiny Llama whose embedding (and lm_head) rows are `embed` / `lm_head`; other weights from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden = embed.shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    sd = model.state_dict()
    sd["model.embed_tokens.weight"] = embed.clone()
    if not tied:
        sd["lm_head.weight"] = (lm_head if lm_head is not None else embed.flip(1)).clone()
    model.load_state_dict(sd, strict=False)
    model.save_pretrained(folder, safe_serialization=True)
    if tok is not None:
        save_tokenizer(tok, folder)
    return folder


def write_gpt2(folder: Path, embed: torch.Tensor, *, seed: int, layers: int = 2, tok=None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, hidden = embed.shape
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=32))
    sd = model.state_dict()
    sd["transformer.wte.weight"] = embed.clone()
    model.load_state_dict(sd, strict=False)
    model.save_pretrained(folder, safe_serialization=True)
    if tok is not None:
        save_tokenizer(tok, folder)
    return folder


def rows_by_token(folder: Path, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """token -> its row of `tensor`, through the tokenizer in `folder` (read with the `tokenizers` library)."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return {t: tensor[i] for t, i in vocab.items() if i < tensor.shape[0]}
