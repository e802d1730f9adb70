"""AdaMerging on checkpoints on disk: Hugging Face folders (the base's module built with transformers) or
any weight files with a model factory (`model=module:factory`); the weights read as tensors
(mergelab.checkpoint); unlabelled inputs from text files or .safetensors tensor files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergeError, fixed_by

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _config_file(folder: Path) -> Path:
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise MergeError(f"{folder} is not a Hugging Face model folder (no config.json); for other checkpoints "
                         "give model= (a module:factory that builds the architecture)", option="model")
    return config


def head_of(folder: Path, head: str = "auto") -> str:
    """"lm" or "classification": the head `head` names, or (auto) the one config.json's architecture has."""
    from mergelab.jsonfile import read_json_file
    from mergelab.search.adamerging.entropy import HEADS

    if head not in HEADS:
        raise MergeError(f"head {head!r} is not one of {', '.join(HEADS)}", option="head")
    if head != "auto":
        return head

    config = read_json_file(_config_file(folder), "model config")
    archs = config.get("architectures") or [""]
    arch = str(archs[0])
    if arch.endswith(CAUSAL_SUFFIXES):
        return "lm"
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    raise MergeError(f"{folder}/config.json: architecture {arch or '(none)'!r} has neither a causal LM head nor "
                     "a sequence classification head that AdaMerging knows; set head='lm' or "
                     "head='classification'", option="head")


def load_base(folder: Path, head: str) -> torch.nn.Module:
    """The base model of `folder` in float32, eval mode, with the Auto class of its head."""
    _config_file(folder)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    except Exception as exc:  # transformers' own errors, for a folder it cannot build
        raise MergeError(f"{folder}: transformers cannot load it as {auto.__name__} "
                         f"({type(exc).__name__}: {exc})") from exc
    return model.eval()


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise MergeError(f"{folder}: cannot load a tokenizer ({type(exc).__name__}: {exc}); give tokenizer= "
                         "a folder with tokenizer files, or token ids in a .safetensors file",
                         option="tokenizer") from exc
    if tok.pad_token is None:  # GPT-2-like tokenizers: pad with EOS (padded positions are masked out)
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _rows_to_batches(ids: torch.Tensor, mask: torch.Tensor | None, batch_size: int) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(ids), batch_size):
        batch = {"input_ids": ids[i:i + batch_size]}
        if mask is not None:
            batch["attention_mask"] = mask[i:i + batch_size]
        out.append(batch)
    return out


def _tensor_batches(path: Path, *, batch_size: int, max_examples: int | None, keyword: bool) -> list[Any]:
    from mergelab.checkpoint.tensor_file import load_tensors

    try:
        tensors = load_tensors(path)
    except Exception as exc:
        raise MergeError(f"cannot read {path} as a safetensors file ({exc})", option="data") from exc
    if not keyword:  # a model factory's module: its one positional input, (examples, ...) rows
        if len(tensors) != 1:
            raise MergeError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); give one "
                             "tensor of input rows (examples, ...)", option="data")
        return list(next(iter(tensors.values()))[:max_examples].split(batch_size))
    ids = tensors.get("input_ids", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if ids is None or ids.dim() != 2 or ids.is_floating_point():
        raise MergeError(f"{path}: expected a tensor `input_ids` of integer token ids, (examples, tokens)",
                         option="data")
    mask = tensors.get("attention_mask")
    return _rows_to_batches(ids[:max_examples].long(), None if mask is None else mask[:max_examples], batch_size)


def file_batches(path: Path, *, tokenizer: Any, batch_size: int = 16, max_length: int = 128,
                 max_examples: int | None = None, keyword: bool = True) -> list[Any]:
    """Batches of {input_ids, attention_mask} from a text file (one example per non-empty line) or a
    .safetensors file holding `input_ids` (and optionally `attention_mask`), (examples, tokens) integers.
    With keyword=False (a model factory's module), a .safetensors file of one tensor whose row batches
    are the module's positional input."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _tensor_batches(path, batch_size=batch_size, max_examples=max_examples, keyword=keyword)
    if tokenizer is None:
        raise MergeError(f"{path} is text, which needs a tokenizer; a model factory's module reads "
                         ".safetensors tensor files", option="data")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"cannot read {path} as UTF-8 text ({exc})", option="data") from exc
    if not lines:
        raise MergeError(f"{path} holds no text (one unlabelled example per line)", option="data")
    enc = tokenizer(lines[:max_examples], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return _rows_to_batches(enc["input_ids"], enc["attention_mask"], batch_size)


def _module_and_batches(base: Path, data: Mapping[str, str | Path], *, model: str | None, head: str,
                        tokenizer: str | Path | None, **reading: Any) -> tuple[torch.nn.Module, str, dict]:
    """The module whose forward runs, the head, and each task's batches."""
    if model is not None:  # any weight files, the architecture from a factory
        from mergelab.analysis.eval_setup import factory_module

        module = factory_module(model, None).eval()
        batches = {t: file_batches(Path(p), tokenizer=None, keyword=False, **reading) for t, p in data.items()}
        return module, head, batches
    with fixed_by("head"):
        kind = head_of(base, head)
    module = load_base(base, kind)
    needs_text = any(Path(p).suffix != ".safetensors" for p in data.values())
    tok = _tokenizer(Path(tokenizer or base)) if needs_text else None
    if kind == "classification" and tok is not None and getattr(module.config, "pad_token_id", None) is None:
        module.config.pad_token_id = tok.pad_token_id  # sequence classifiers find each example's last token by it
    return module, kind, {t: file_batches(Path(p), tokenizer=tok, **reading) for t, p in data.items()}


def adamerging_folders(base: str | Path, models: Sequence[str | Path], data: Mapping[str, str | Path], *,
                       model: str | None = None, head: str = "auto", tokenizer: str | Path | None = None,
                       batch_size: int = 16, max_length: int = 128, max_examples: int | None = None,
                       **settings: Any):
    """AdaMerging (mergelab.search.adamerging.adamerging, `settings` its keywords) on checkpoints on disk.

    `base`, `models`: Hugging Face folders, or with `model` (a `module:factory` / `file.py:factory` that
    builds the architecture) any checkpoints mergelab reads. `data`: task name -> its unlabelled inputs,
    one task per model in the models' order: a text file or a .safetensors of input_ids (folders), a
    .safetensors of one input tensor (factory). Returns the AdaMergingResult; result.recipe(base, models)
    is the recipe.
    """
    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.search.adamerging.train import adamerging

    module, kind, batches = _module_and_batches(Path(base), data, model=model, head=head, tokenizer=tokenizer,
                                                batch_size=batch_size, max_length=max_length,
                                                max_examples=max_examples)
    with Checkpoint(base) as base_ck:
        checkpoints = [Checkpoint(p) for p in models]
        try:
            return adamerging(module, checkpoints, batches, head=kind, base_weights=base_ck, **settings)
        finally:
            for ck in checkpoints:
                ck.close()
