"""Model references as a recipe writes them: which fields name models, `model+lora`, and local paths.

Only file-system lookups of paths as written; Hub ids and adapters are resolved
later, by mergelab.recipe.resolve.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mergelab.tokenizer.config import token_source_models

if TYPE_CHECKING:
    from mergelab.recipe.model import Recipe

__all__ = ["references", "local_path", "split_lora_reference"]


def split_lora_reference(ref: str) -> tuple[str, str] | None:
    """MergeKit's `model+lora` reference -> (model, adapter), or None when `ref` is not one.

    A path that exists as written (even with a '+' in its name) is a plain path.
    """
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    model, _, adapter = ref.rpartition("+")
    return (model, adapter) if model and adapter else None


def references(r: Recipe) -> list[tuple[str, str]]:
    """(field path, model reference as written) for every path the recipe names."""
    refs = [("base_model", r.base_model)] if r.base_model else []
    refs += [("base_stats", r.base_stats)] if r.base_stats else []
    for i, m in enumerate(r.models or []):
        refs += [(f"models[{i}].model", m.model)] + ([(f"models[{i}].stats", m.stats)] if m.stats else [])
    for i, sl in enumerate(r.slices or []):
        refs += [(f"slices[{i}].base_model", sl.base_model)] if sl.base_model else []
        for j, s in enumerate(sl.sources):
            where = f"slices[{i}].sources[{j}]"
            refs += [(f"{where}.model", s.model)] + ([(f"{where}.stats", s.stats)] if s.stats else [])
    tok, where = (r.tokenizer.source, "tokenizer.source") if r.tokenizer else (r.tokenizer_source, "tokenizer_source")
    if tok and tok not in ("base", "union"):
        refs.append((where, tok))
    return refs + token_source_models(r.tokenizer)


def local_path(ref: str, folder: Path | None) -> str:
    """The local path of a model reference: the current folder first, then the recipe's folder;
    what exists nowhere stays as written (a Hub id, or a path reported missing)."""
    p = Path(ref).expanduser()
    lora = split_lora_reference(ref)
    if lora is not None and not p.exists():  # MergeKit's model+lora: each part resolves on its own
        return "+".join(local_path(part, folder) for part in lora)
    if p.is_absolute():
        return os.path.normpath(p)
    if p.exists():
        return os.path.abspath(p)
    if folder is not None and (folder / p).exists():
        return os.path.abspath(folder / p)
    return os.path.normpath(p)

