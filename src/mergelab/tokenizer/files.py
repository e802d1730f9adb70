"""The output tokenizer's files: the reference's, with union or `tokens:` additions and the chat template.

Tokens are added as MergeKit's build_union_tokenizer adds them: to the
reference (base) tokenizer, first every other model's ordinary tokens it lacks
(in model order: the reference, then the recipe's models), then every model's
added tokens with their settings (the first model's settings win). Adding
needs transformers (AutoTokenizer.add_tokens, save_pretrained). A chat
template is written into tokenizer_config.json's `chat_template`, where
transformers reads it; separate chat_template.jinja/.json files are dropped so
they cannot override it.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from mergelab.checkpoint.reader import asset_file
from mergelab.errors import RecipeError
from mergelab.jsonfile import read_json_file
from mergelab.tokenizer.templates import TEMPLATES, is_template_name
from mergelab.tokenizer.vocab import added_tokens

# The files of a tokenizer (as checkpoint/assets.py's TOKENIZER_FILES); copied as a set or not at all.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def union_additions(reference: str, order: list[str], full: dict, maps: dict,
                    folders: dict) -> tuple[list[str], list[dict]]:
    """(ordinary tokens, added-token records) that MergeKit's union adds to the reference tokenizer.

    MergeKit walks each model's vocabulary in the order of tokenizers' get_vocab(), a Rust hash map whose
    order changes from run to run, so the ids it gives new tokens vary; mergelab takes them in each
    model's id order, so a recipe always gives the same tokenizer.
    """
    plain: dict[str, None] = {}
    added: dict[str, dict] = {}
    for p in order:
        records = added_tokens(folders[p])
        for tok in sorted(maps[p], key=maps[p].__getitem__):  # the model's own id order (MergeKit's is hash order)
            if tok in records:
                added.setdefault(tok, records[tok])
            else:
                plain.setdefault(tok)
    ref_added = added_tokens(folders[reference])
    ordinary = [t for t in plain if t not in added and t not in full[reference]]
    return ordinary, [r for t, r in added.items() if t not in ref_added]


def _transformers_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise RecipeError("building the output tokenizer (tokenizer_source: union, or tokens the reference "
                          "lacks) needs transformers; install it (pip install mergelab[hf])") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many kinds
        raise RecipeError(f"the tokenizer of {folder} cannot be loaded by transformers ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); fix its tokenizer files") from None


def _saved(tok) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="mergelab-tok-") as tmp:
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _reference_files(folder: Path) -> dict[str, bytes]:
    return {name: path.read_bytes() for name in TOKENIZER_FILES if (path := asset_file(folder, name)) is not None}


def model_chat_template(folder: Path | None) -> str | None:
    """A model's own chat template (tokenizer_config.json's, else chat_template.jinja), or None."""
    if folder is None:
        return None
    jinja = asset_file(folder, "chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    config = asset_file(folder, "tokenizer_config.json")
    value = read_json_file(config, "tokenizer config", expect=dict).get("chat_template") if config else None
    return value if isinstance(value, str) else None


def resolve_chat_template(text: str, folders: dict) -> str:
    """The template a recipe's `chat_template:` stands for (MergeKit's _set_chat_template rules)."""
    if text == "auto":
        found = [t for t in (model_chat_template(f) for f in folders.values()) if t]
        if not found:
            raise RecipeError("chat_template: auto picks the template most models have, and none of the models "
                              f"has one; name one ({', '.join(sorted(TEMPLATES))}) or give a Jinja template")
        return Counter(found).most_common(1)[0][0]
    if is_template_name(text):
        if text not in TEMPLATES:
            raise RecipeError(f"chat_template: {text!r} is not a template mergelab knows; use one of "
                              f"{', '.join(sorted(TEMPLATES))}, `auto`, or a Jinja template")
        return TEMPLATES[text]
    if len(text) < 20 or "{" not in text:
        raise RecipeError(f"chat_template: {text[:40]!r} is neither a template name nor a Jinja template")
    return text


def with_chat_template(files: dict[str, bytes], template: str) -> dict[str, bytes]:
    files = {k: v for k, v in files.items() if k not in ("chat_template.jinja", "chat_template.json")}
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    config["chat_template"] = template
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files


# Files a rebuilt tokenizer.json makes stale: transformers would read their tokens next to it.
_STALE = ("added_tokens.json",)


def _json_union(folder: Path, path: Path, ordinary: list[str], records: list[dict],
                extra: list[str]) -> tuple[dict[str, bytes], dict[str, int]] | None:
    """The reference's tokenizer files with tokens added to tokenizer.json; (files, token -> id).

    Other models' ordinary tokens go into the tokenizer model's own vocabulary (BPE, WordPiece,
    WordLevel), not in as added tokens as MergeKit puts them: an added token is cut out of raw text
    before pre-tokenisation, so MergeKit's union re-tokenises the base's text wherever it spells a
    token of another model ("models" inside "the models", "ing" inside any word); in the vocabulary
    they change nothing of how the base's text encodes. Added (special) tokens and `tokens:` go in
    as added tokens. New ids follow the largest id, in that order, as add_tokens numbers them.

    The tokenizers library numbers an added token that is not in the model's vocabulary from the
    vocabulary's size on (ignoring the id stored in the file), so the reference's added tokens below
    the new ids are entered in the model's vocabulary too, at their own ids; None (use MergeKit's
    way) when the ids are not contiguous or the model's vocabulary is not a token -> id mapping.
    """
    data = read_json_file(path, "tokenizer", expect=dict)
    model = data.get("model") or {}
    vocab = model.get("vocab")
    added = list(data.get("added_tokens") or [])
    if not isinstance(vocab, dict) or not ordinary:
        return None
    vocab = {str(t): int(i) for t, i in vocab.items()}
    for e in added:
        vocab.setdefault(str(e["content"]), int(e["id"]))
    next_id = len(vocab)
    if set(vocab.values()) != set(range(next_id)):
        return None
    for tok in ordinary:
        vocab[tok] = next_id
        next_id += 1
    new_added = []
    for rec in [*records, *({"content": t, "special": False, "normalized": True} for t in extra)]:
        new_added.append({"id": next_id, "content": rec["content"], "single_word": rec.get("single_word", False),
                          "lstrip": rec.get("lstrip", False), "rstrip": rec.get("rstrip", False),
                          "normalized": rec.get("normalized", True), "special": rec.get("special", False)})
        next_id += 1
    model["vocab"] = vocab
    data["added_tokens"] = added + new_added
    files = {k: v for k, v in _reference_files(folder).items() if k not in _STALE}
    files["tokenizer.json"] = (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and new_added:
        for e in new_added:
            decoder[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files, {**vocab, **{str(e["content"]): int(e["id"]) for e in data["added_tokens"]}}


def output_tokenizer(recipe, reference: str, folders: dict, full: dict, maps: dict, tokens: dict,
                     union: bool) -> tuple[dict[str, bytes] | None, dict[str, int] | None]:
    """(files, vocabulary) of the output tokenizer; (None, None): the reference's files, unchanged."""
    ordinary, records = union_additions(reference, list(maps), full, maps, folders) if union else ([], [])
    extra = [t for t in tokens if t not in full[reference] and t not in ordinary
             and t not in {r["content"] for r in records}]
    template = recipe.chat_template
    if not (ordinary or records or extra or template):
        return None, None
    vocab = None
    reference_json = asset_file(folders[reference], "tokenizer.json")
    built = _json_union(folders[reference], reference_json, ordinary, records, extra) if reference_json else None
    if built is not None:
        files, vocab = built
    elif ordinary or records or extra:  # MergeKit's way, through transformers (only added tokens, no tokenizer.json)
        from tokenizers import AddedToken

        tok = _transformers_tokenizer(folders[reference])
        for t in ordinary:
            tok.add_tokens(t)
        for r in records:
            tok.add_tokens(AddedToken(r["content"], single_word=r.get("single_word", False),
                                      lstrip=r.get("lstrip", False), rstrip=r.get("rstrip", False),
                                      normalized=r.get("normalized", True), special=r.get("special", False)))
        for t in extra:
            tok.add_tokens(t)
        vocab = dict(tok.get_vocab())
        files = _saved(tok)
    else:
        files = _reference_files(folders[reference])
    if template:
        files = with_chat_template(files, resolve_chat_template(template, folders))
    return files, vocab


def template_only_files(template: str, reference: str, folders: dict) -> dict[str, bytes]:
    """The reference's tokenizer files with `chat_template:` written in."""
    folder = folders.get(reference)
    files = _reference_files(folder) if folder is not None else {}
    if not any(name in files for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        raise RecipeError(f"chat_template: '{reference}' has no tokenizer files to write the template into; "
                          "name a model that has them in tokenizer_source, or remove chat_template")
    return with_chat_template(files, resolve_chat_template(template, folders))
