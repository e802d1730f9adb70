"""Read a model folder's vocabulary (token -> row) from its tokenizer files, without loading a tokenizer.

The vocabulary is what transformers' `tokenizer.get_vocab()` returns: the
tokenizer model's own tokens and the added tokens, each with its id, which is
the row of that token in the embedding and lm_head. It is read from
tokenizer.json (fast tokenizers), else vocab.json + added_tokens.json (GPT-2
style files), else vocab.txt (WordPiece, one token a line); a folder with only
a sentencepiece tokenizer.model is read through transformers. Tokens that
tokenizer_config.json's `added_tokens_decoder` adds are included, as
transformers adds them on load.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from mergelab.checkpoint.reader import asset_file
from mergelab.errors import CheckpointError
from mergelab.jsonfile import read_json_file

TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")


def has_tokenizer(folder: str | Path | None) -> bool:
    """Whether `folder` holds tokenizer files mergelab can read a vocabulary from."""
    return folder is not None and any((Path(folder) / f).is_file() for f in TOKENIZER_MARKERS)


def _from_tokenizer_json(path: Path) -> dict[str, int]:
    data = read_json_file(path, "tokenizer", expect=dict)
    model = data.get("model") or {}
    raw = model.get("vocab")
    if isinstance(raw, dict):  # BPE, WordPiece, WordLevel
        vocab = {str(k): int(v) for k, v in raw.items()}
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], the id is the position
        vocab = {str(item[0]): i for i, item in enumerate(raw)}
    else:
        raise CheckpointError(f"{path}: its model ({model.get('type')!r}) has no vocabulary mergelab can read; "
                              "the vocabulary must be a token -> id mapping or a Unigram piece list")
    for entry in data.get("added_tokens") or []:
        vocab[str(entry["content"])] = int(entry["id"])
    return vocab


def _from_vocab_json(folder: Path, path: Path) -> dict[str, int]:
    vocab = {str(k): int(v) for k, v in read_json_file(path, "vocabulary", expect=dict).items()}
    added = asset_file(folder, "added_tokens.json")
    if added is not None:
        vocab.update({str(k): int(v) for k, v in read_json_file(added, "added tokens", expect=dict).items()})
    return vocab


def _from_vocab_txt(path: Path) -> dict[str, int]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for i, token in enumerate(lines):
        vocab.setdefault(token.rstrip("\r"), i)
    return vocab


def _from_sentencepiece(folder: Path) -> dict[str, int]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(f"{folder}: its tokenizer is a sentencepiece tokenizer.model, which mergelab reads "
                              "through transformers; install it (pip install mergelab[hf])") from None
    try:
        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as exc:  # transformers raises many kinds; the message says which file failed
        raise CheckpointError(f"{folder}: its tokenizer.model cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); fix the tokenizer files") from None


# Files a vocabulary is read from; their identity (lstat and stat) keys the cache below.
_VOCAB_FILES = (*TOKENIZER_MARKERS, "added_tokens.json", "tokenizer_config.json")
_CACHE: dict[tuple, tuple[dict[str, int] | None, int | None]] = {}  # identity -> (vocabulary, content id)
_CACHE_SIZE = 16
# Content ids: equal vocabularies (read from any folder) get the same id, so a planner can tell
# that several models share one vocabulary without comparing their dicts at every plan.
_CONTENT_IDS: list[tuple[dict[str, int], int]] = []
_NEXT_ID = itertools.count(1)


def _identity(folder: Path) -> tuple:
    key: list = [str(folder.resolve())]
    for name in _VOCAB_FILES:
        path = folder / name
        try:
            link, target = os.lstat(path), os.stat(path)
        except OSError:
            key.append(None)
            continue
        key.append((link.st_ino, link.st_mode, link.st_mtime_ns, target.st_ino, target.st_size, target.st_mtime_ns))
    return tuple(key)


def read_vocabulary(folder: str | Path | None) -> dict[str, int] | None:
    """token -> id of the tokenizer in model folder `folder`; None when it has no tokenizer files.

    A search plans one merge per candidate over the same folders, so the vocabulary is
    cached per folder, keyed on the identity (inode, size, mtime) of every file it is
    read from: a file that changes, or is replaced by a link, is read again.

    Raises:
        CheckpointError: tokenizer files that exist but cannot be read.
    """
    vocab, _ = _cached(folder)
    return None if vocab is None else dict(vocab)


def vocabulary_id(folder: str | Path | None) -> int | None:
    """An id of the vocabulary's content: equal for two folders exactly when read_vocabulary
    gives them equal vocabularies (None: no tokenizer files). Cached as read_vocabulary is."""
    return _cached(folder)[1]


def _cached(folder: str | Path | None) -> tuple[dict[str, int] | None, int | None]:
    if folder is None:
        return None, None
    folder = Path(folder)
    key = _identity(folder)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        vocab = _read_vocabulary(folder)
        _CACHE[key] = (vocab, None if vocab is None else _content_id(vocab))
    return _CACHE[key]


def _content_id(vocab: dict[str, int]) -> int:
    live = {cid for _, cid in _CACHE.values() if cid is not None}
    _CONTENT_IDS[:] = [(v, cid) for v, cid in _CONTENT_IDS if cid in live]  # forget evicted contents
    for other, cid in _CONTENT_IDS:
        if other == vocab:
            return cid
    cid = next(_NEXT_ID)  # never reused: an id handed out before an eviction keeps meaning its content
    _CONTENT_IDS.append((vocab, cid))
    return cid


def _read_vocabulary(folder: Path) -> dict[str, int] | None:
    try:
        if (path := asset_file(folder, "tokenizer.json")) is not None:
            vocab = _from_tokenizer_json(path)
        elif (path := asset_file(folder, "vocab.json")) is not None:
            vocab = _from_vocab_json(folder, path)
        elif (path := asset_file(folder, "vocab.txt")) is not None:
            vocab = _from_vocab_txt(path)
        elif asset_file(folder, "tokenizer.model") is not None:
            return _from_sentencepiece(folder)
        else:
            return None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: its tokenizer files cannot be read as a vocabulary "
                              f"({type(exc).__name__}: {str(exc)[:200]}); fix or re-download them") from None
    config = asset_file(folder, "tokenizer_config.json")
    if config is not None:
        decoder = read_json_file(config, "tokenizer config", expect=dict).get("added_tokens_decoder") or {}
        if isinstance(decoder, dict):
            for idx, info in decoder.items():
                content = info.get("content") if isinstance(info, dict) else None
                if isinstance(content, str) and content not in vocab and str(idx).isdigit():
                    vocab[content] = int(idx)
    return vocab


def added_tokens(folder: str | Path | None) -> dict[str, dict]:
    """content -> the added-token record (special, lstrip, ...) of tokenizer.json's added_tokens."""
    path = asset_file(folder, "tokenizer.json") if folder is not None else None
    if path is None:
        return {}
    data = read_json_file(path, "tokenizer", expect=dict)
    return {str(e["content"]): dict(e) for e in data.get("added_tokens") or [] if isinstance(e, dict)}
