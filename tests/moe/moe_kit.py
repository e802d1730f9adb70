"""Tiny dense Llama experts that prompts can tell apart, built by the tests (no network).

Three domains with their own words (arithmetic, cooking, code) and a few words
they share. A base model is trained briefly on all three, then each expert is
the base trained a few more steps on its own domain, so the experts differ and
the base's hidden states tell the domains apart, as a real model's would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

SHARED = ["the", "a", "and", "then", "with", "is", "to", "of"]
DOMAINS = {
    "math": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "plus", "minus", "times",
             "equals", "sum", "half", "double"],
    "cooking": ["bake", "flour", "sugar", "oven", "butter", "egg", "salt", "pan", "stir", "boil", "onion",
                "garlic", "knead", "dough", "slice", "pepper"],
    "code": ["def", "return", "if", "else", "for", "while", "import", "class", "print", "list", "loop", "int",
             "var", "call", "none", "true"],
}
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def vocabulary() -> list[str]:
    return SPECIAL + SHARED + [w for words in DOMAINS.values() for w in words]


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer made with `tokenizers`, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)


def sentence(domain: str, gen: torch.Generator, length: int = 8) -> str:
    """Mostly words of `domain`, with a shared word now and then."""
    words = []
    for _ in range(length):
        pool = SHARED if torch.rand((), generator=gen) < 0.25 else DOMAINS[domain]
        words.append(pool[int(torch.randint(len(pool), (), generator=gen))])
    return " ".join(words)


def sentences(domain: str, n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [sentence(domain, gen, length=6 + int(torch.randint(5, (), generator=gen))) for _ in range(n)]


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(vocabulary()), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _train(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int) -> None:
    """A few AdamW steps of next-token prediction on `texts` (one thread: tiny models only lose by more)."""
    enc = tokenizer([tokenizer.bos_token + t for t in texts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(texts), (16,), generator=gen)
            loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def write_experts(root: Path, base_steps: int = 80, expert_steps: int = 25) -> dict[str, Path]:
    """base/ and one expert folder per domain (float32 safetensors, with the tokenizer)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok_dir = root / "tokenizer"
    write_tokenizer(tok_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tok.padding_side = "right"
    data = {d: sentences(d, 200, seed=i) for i, d in enumerate(DOMAINS)}
    base = LlamaForCausalLM(llama_config())
    _train(base, tok, [s for texts in data.values() for s in texts], base_steps, 3e-3, seed=10)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i, domain in enumerate(DOMAINS):
        model = LlamaForCausalLM(llama_config())
        model.load_state_dict(base.state_dict())
        _train(model, tok, data[domain], expert_steps, 3e-3, seed=20 + i)
        paths[domain] = root / domain
        model.save_pretrained(paths[domain])
        tok.save_pretrained(paths[domain])
    return paths


# -- fixtures and configs for the tests ------------------------------------------------------

_BUILT: dict[str, dict[str, Path]] = {}


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """The experts, trained once per test session (the fixture is imported by several test modules,
    and pytest would otherwise run it once per module). Not a conftest.py: tests/conftest.py is
    imported as `conftest` by other tests, and a second conftest.py would shadow it."""
    if "family" not in _BUILT:
        _BUILT["family"] = write_experts(tmp_path_factory.mktemp("moe-experts"))
    return _BUILT["family"]


def positive_prompts(index: int, domain: str) -> list[str]:
    return sentences(domain, 8, seed=100 + index)


def held_out_prompts(index: int, domain: str) -> list[str]:
    return sentences(domain, 20, seed=500 + index)


def moe_config(family: dict[str, Path], **overrides) -> dict:
    """A mergekit-moe config: the trained base, one expert per domain with its prompts."""
    config = {"base_model": str(family["base"]), "gate_mode": "hidden", "dtype": "float32",
              "experts_per_token": 2,
              "experts": [{"source_model": str(family[d]), "positive_prompts": positive_prompts(i, d)}
                          for i, d in enumerate(DOMAINS)]}
    config.update(overrides)
    return config


def write_config(folder: Path, config: dict, name: str = "moe.yml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
