"""Statistics of a Hugging Face model on a text or JSONL file: what `mergelab stats` runs.

The data is a plain text file (one example per non-empty line) or JSONL (the
field `text`). Each example is tokenised to at most `seq_len` tokens; for the
Fisher, the labels are the next tokens (causal LMs) so the empirical Fisher is
that of the language-modelling loss. Statistics are keyed like the model's own
tensors, so a recipe can point `models[i].stats` at the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergelab.errors import StatsError


def read_texts(path: str | Path, max_examples: int) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"data file {path} does not exist")
    texts: list[str] = []
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StatsError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "save it as UTF-8") from None
    for i, line in enumerate(content.splitlines()):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                line = str(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise StatsError(f"{path}: line {i + 1} is not a JSON object with a 'text' field") from None
        texts.append(line)
        if len(texts) >= max_examples:
            break
    if not texts:
        raise StatsError(f"{path} holds no examples")
    return texts


def load_model(model_dir: str | Path):
    """(model, tokenizer) from a local folder; causal LMs with their LM head, other models bare.

    Only the local folder is read (never the network): a path that is not a
    model folder is refused at once. Any failure of transformers to load it
    (a damaged config, an unsafe pickle refused by weights_only loading, ...)
    becomes a StatsError naming the folder.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir)
    if not folder.is_dir():
        raise StatsError(f"model folder {folder} does not exist; give the local folder of a Hugging Face model")
    if not (folder / "config.json").is_file():
        raise StatsError(f"{folder} has no config.json; give the folder of a Hugging Face model")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; all mean "this folder does not load"
        if type(exc).__name__ == "UnpicklingError":
            raise StatsError(f"refused to load the weights in {folder}: their pickle holds more than plain tensors, "
                             "and mergelab unpickles with weights_only=True, never running code from a file; "
                             "get safetensors weights from a source you trust") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StatsError(f"cannot load the model in {folder} with transformers ({type(exc).__name__}: "
                         f"{first[:300]}); check the folder's config and weights") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model.eval(), tok, causal


def batches(texts: list[str], tokenizer, *, seq_len: int, batch_size: int, with_labels: bool):
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels:
            labels = torch.full_like(enc["input_ids"], -100)
            labels[:, :-1] = enc["input_ids"][:, 1:]
            labels[:, :-1][enc["attention_mask"][:, 1:] == 0] = -100  # no target past the padding
            batch["labels"] = labels
        yield batch


def gram_for(model_dir, data, *, max_examples: int = 256, seq_len: int = 128, batch_size: int = 8):
    from mergelab.stats.gram import gram_matrices

    model, tok, _ = load_model(model_dir)
    texts = read_texts(data, max_examples)
    with torch.no_grad():
        return gram_matrices(model, batches(texts, tok, seq_len=seq_len, batch_size=batch_size, with_labels=False))


def fisher_for(model_dir, data, *, kind: str = "empirical", max_examples: int = 64, seq_len: int = 64,
               batch_size: int = 4):
    from mergelab.stats.fisher import diagonal_fisher

    model, tok, causal = load_model(model_dir)
    if not causal:
        raise StatsError(f"{model_dir}: `mergelab stats fisher` needs a causal LM (its LM head gives the "
                         "predictive distribution); for other models call mergelab.stats.fisher.diagonal_fisher "
                         "with your own classifier")
    texts = read_texts(data, max_examples)
    return diagonal_fisher(model, batches(texts, tok, seq_len=seq_len, batch_size=batch_size, with_labels=True),
                           kind=kind, max_examples=max_examples)
