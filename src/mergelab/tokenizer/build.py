"""The output vocabulary of a merge and, for every model, where its rows go in it.

`plan_vocabulary` decides, before any tensor is read:
- the output vocabulary: the reference tokenizer's (tokenizer_source `base`, a
  model path, or none given: the base model's, else the first model's),
  or MergeKit's union (`union`), plus the tokens `tokens:` names;
- each model's token -> row map, read from its own tokenizer files, so rows are
  matched by token and never by position;
- the output tokenizer files when they differ from the reference's (see files.py).

Without tokenizer_source it changes nothing when every model's vocabulary is
the reference's (or no model has tokenizer files): rows then line up by index,
as MergeKit assumes. When they hold the same tokens in another order, rows are
matched by token as `tokenizer_source: base` would. Where a model's rows cannot
be matched to tokens (no tokenizer files and another number of rows) the merge
is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from mergelab.checkpoint.reader import EMBEDDING_NAMES
from mergelab.errors import RecipeError, ShapeMismatch
from mergelab.tokenizer.config import ModelTokenSource, TokenEntry, ZeroSource
from mergelab.tokenizer.embed import ZERO, VocabJob
from mergelab.tokenizer.vocab import read_vocabulary, vocabulary_id


def embedding_rows(ck) -> int | None:
    """Rows of a checkpoint's input embedding (else lm_head), None if it has neither."""
    name = next((n for n in EMBEDDING_NAMES if n in ck), None) or ("lm_head.weight" if "lm_head.weight" in ck else None)
    return ck.shape(name)[0] if name else None


@dataclasses.dataclass
class VocabularyPlan:
    """The output vocabulary and every model's token -> row map (rows below its embedding's)."""

    out_vocab: dict[str, int]
    rows: int
    maps: dict[str, dict[str, int]]  # model path -> token -> its row
    full: dict[str, dict[str, int]]  # model path -> its tokenizer's whole vocabulary
    model_rows: dict[str, int]
    tokens: dict[str, TokenEntry]  # `tokens:` with model references resolved
    tokenizer_files: dict[str, bytes] | None  # None: copy the reference's files unchanged
    notes: list[str]

    def job(self, models: list[str], base: str | None, where: str) -> VocabJob:
        """The row maps and fills for one job whose inputs are `models` (paths, in input order)."""
        vocab_len = max(self.out_vocab.values(), default=-1) + 1
        index = torch.stack([self._index(m, vocab_len) for m in models])  # (M, rows)
        token_of = self._tokens_by_id()
        ids = torch.tensor(sorted(token_of), dtype=torch.long)
        lacking = ids[(index[:, ids] < 0).any(0)].tolist()
        forced = [self.out_vocab[t] for t, cfg in self.tokens.items() if cfg.force and t in self.out_vocab]
        fill_rows = sorted(set(lacking) | set(forced))
        fill_sources = []
        for oid in fill_rows:
            token = token_of[oid]
            present = (index[:, oid] >= 0).nonzero().flatten().tolist()
            fill_sources.append(self._fill(token, oid, self.tokens.get(token), models, present, base, where))
        if forced:
            index[:, forced] = -1  # a forced token takes its source's row in every model
        return VocabJob(self.rows, vocab_len, tuple(index), torch.tensor(fill_rows, dtype=torch.long),
                        tuple(fill_sources))

    def _tokens_by_id(self) -> dict[int, str]:
        if getattr(self, "_token_of", None) is None:
            self._token_of = {oid: t for t, oid in self.out_vocab.items()}
        return self._token_of

    def _index(self, model: str, vocab_len: int) -> torch.Tensor:
        """(rows,) the model's row for each output row, -1 where it has none (computed once per model)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        if model not in cache:
            own = self.maps[model]
            index = [-1] * self.rows
            for token, oid in self.out_vocab.items():
                row = own.get(token)
                if row is not None:
                    index[oid] = row
            # Rows past the vocabulary: the model's own row there when it holds no token of the model.
            used = set(own.values())
            for r in range(vocab_len, min(self.rows, self.model_rows[model])):
                if r not in used:
                    index[r] = r
            cache[model] = torch.tensor(index, dtype=torch.long)
        return cache[model].clone()

    def _fill(self, token, oid, cfg, models, present, base, where) -> tuple:
        """MergeKit's assign_embedding_sources + compute_default_embedding for one token."""
        if cfg is not None and cfg.source is not None:
            src = cfg.source
            if isinstance(src, ZeroSource):
                return ZERO
            model = src.model if isinstance(src, ModelTokenSource) else src
            if model not in models:
                raise RecipeError(f"tokenizer.tokens[{token!r}]: model '{model}' is not an input of {where}; "
                                  "take the row from one of its models")
            j = models.index(model)
            if isinstance(src, ModelTokenSource):
                row = src.token_id if src.token_id is not None else self.full[model].get(src.token)
                if row is None or row >= self.model_rows[model]:
                    what = f"token {src.token!r}" if src.token_id is None else f"token id {src.token_id}"
                    raise RecipeError(f"tokenizer.tokens[{token!r}].source: {what} is not in the "
                                      f"{self.model_rows[model]} rows of '{model}'; check the token")
                return ((j, row),)
            row = self.maps[model].get(token)
            if row is None:
                raise RecipeError(f"tokenizer.tokens[{token!r}].source: '{model}' has no token {token!r}; "
                                  "name a model that has it, or use {kind: model_token, model: ..., token: ...}")
            return ((j, row),)
        if len(present) == 1:
            j = present[0]
            return ((j, self.maps[models[j]][token]),)
        if not present:
            return ZERO
        if base in models and models.index(base) in present:
            j = models.index(base)
            return ((j, self.maps[base][token]),)
        return tuple((j, self.maps[models[j]][token]) for j in present)


def _stripped(vocab: Mapping[str, int], rows: int) -> dict[str, int]:
    return {t: i for t, i in vocab.items() if 0 <= i < rows}


def _fill_missing(recipe, reference: str, rows: dict, full: dict, missing: list[str], explicit: bool
                  ) -> list[str] | None:
    """Models without tokenizer files take the reference's tokens when their row counts agree (notes say
    so); None: rows are cut or padded by index instead (vocab_mismatch: resize); else a ShapeMismatch."""
    bad = [p for p in missing if rows[p] != rows[reference]]
    if bad and not explicit and recipe.vocab_mismatch == "resize":
        return None  # the recipe asked for rows cut or padded by index
    if bad:
        raise ShapeMismatch("\n".join(
            f"model '{p}' has no tokenizer files and {rows[p]} embedding rows where '{reference}' has "
            f"{rows[reference]}: mergelab cannot tell which row is which token; add the model's tokenizer "
            "files (or, if its first rows are the same tokens, `vocab_mismatch: resize` without "
            "tokenizer_source cuts or pads them by index)" for p in bad))
    notes = []
    for p in missing:
        full[p] = full[reference]
        notes.append(f"'{p}' has no tokenizer files: its rows are taken as '{reference}''s tokens (same row count)")
    return notes


def _output_rows(out_vocab: Mapping[str, int], reference_rows: int, pad: int | None) -> int:
    """Rows of the output's embeddings: its tokens, at least the reference's rows, padded to `pad`."""
    # Keep rows the reference has past its tokenizer (padding; MergeKit cuts them, arcee-ai/mergekit#425).
    n = max(max(out_vocab.values(), default=-1) + 1, reference_rows)
    if pad and n % pad:
        n += pad - n % pad
    return n


def plan_vocabulary(recipe, checkpoints: Mapping, reference: str, merged: list[str]) -> VocabularyPlan | None:
    """The vocabulary plan of a merge, or None when rows line up by index (nothing to do).

    Args:
        recipe: the validated Recipe.
        checkpoints: path -> opened Checkpoint.
        reference: the path whose tokenizer the output starts from.
        merged: the model paths whose vocabulary tensors are merged.
    """
    from mergelab.tokenizer.files import output_tokenizer  # transformers only when a tokenizer is rebuilt

    entry = recipe.tokenizer
    source = entry.source if entry else recipe.tokenizer_source
    explicit = source is not None
    tokens = {tok: _resolved(recipe, cfg) for tok, cfg in ((entry.tokens or {}) if entry else {}).items()}
    pad = entry.pad_to_multiple_of if entry else None
    paths = list(dict.fromkeys([reference, *merged]))
    rows = {p: embedding_rows(checkpoints[p]) for p in paths}
    if rows[reference] is None:
        return None  # no vocabulary tensors at all
    rows = {p: r for p, r in rows.items() if r is not None}
    folders = {p: getattr(checkpoints[p], "folder", None) for p in rows}
    if not explicit and len(set(rows.values())) == 1:
        ids = {vocabulary_id(folders[p]) for p in rows}
        if len(ids) == 1 and None not in ids:
            return None  # one vocabulary on the same rows: the check below, without copying and comparing dicts
    full = {p: read_vocabulary(folders[p]) for p in rows}
    missing = [p for p, v in full.items() if v is None]
    needs_tokens = source == "union" or bool(tokens) or bool(pad)
    if len(missing) == len(full) and not needs_tokens:
        return None  # nobody says which row is which token: by index, as MergeKit does
    if full[reference] is None:
        raise RecipeError(f"the output's tokenizer comes from '{reference}', which has no tokenizer files "
                          "(tokenizer.json, vocab.json, vocab.txt or tokenizer.model); add them, or name "
                          "a model that has them in tokenizer_source")
    notes = _fill_missing(recipe, reference, rows, full, missing, explicit)
    if notes is None:
        return None
    if not explicit and all(rows[p] == rows[reference] and full[p] == full[reference] for p in rows):
        return None  # the same tokens on the same rows everywhere: the common case, decided before stripping
    maps = {p: _stripped(full[p], rows[p]) for p in rows}
    if not explicit:
        if all(maps[p] == maps[reference] and rows[p] == rows[reference] for p in rows):
            return None
        sizes = {rows[p] for p in rows}
        if len(sizes) > 1 and recipe.vocab_mismatch != "resize":
            raise ShapeMismatch(
                "the models' vocabularies differ (" + ", ".join(f"'{p}': {rows[p]} rows" for p in rows)
                + "); add `tokenizer_source: base` (the base's tokens, rows matched by token) or "
                "`tokenizer_source: union` (every model's tokens) to the recipe")
        notes.append(f"the models' vocabularies order their tokens differently: rows matched by token to "
                     f"'{reference}''s vocabulary (as tokenizer_source: base)")
    files, out_vocab = output_tokenizer(recipe, reference, folders, full, maps, tokens, source == "union")
    if out_vocab is None:
        out_vocab = dict(full[reference])
    n = _output_rows(out_vocab, rows[reference], pad)
    return VocabularyPlan(out_vocab, n, maps, {p: dict(v) for p, v in full.items()}, rows, tokens, files, notes)


def _resolved(recipe, cfg: TokenEntry) -> TokenEntry:
    src = cfg.source
    if isinstance(src, str):
        return cfg.model_copy(update={"source": recipe.resolve(src)})
    if isinstance(src, ModelTokenSource):
        return cfg.model_copy(update={"source": src.model_copy(update={"model": recipe.resolve(src.model)})})
    return cfg


def tokenizer_files(recipe, checkpoints: Mapping, reference: str, vocab: VocabularyPlan | None) -> dict | None:
    """The output tokenizer's files when they are not the reference's, unchanged (None)."""
    from mergelab.tokenizer.files import template_only_files

    if vocab is not None and vocab.tokenizer_files is not None:
        return vocab.tokenizer_files
    if not recipe.chat_template:  # MergeKit ignores an empty one too
        return None
    folders = {p: getattr(ck, "folder", None) for p, ck in checkpoints.items()}
    return template_only_files(recipe.chat_template, reference, folders)
