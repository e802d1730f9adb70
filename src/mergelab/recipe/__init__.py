"""YAML recipes in MergeKit's format, validated completely before any tensor is read.

    model.py       the Recipe (pydantic, fields as MergeKit writes them) and its output slices
    load.py        load_recipe: a file, YAML text or a dict -> a validated Recipe (no checkpoint read,
                   no Hub access)
    checks.py      every check beyond the schema (structure, method, parameters, paths)
    params.py      parameter settings: their shapes, checks, and value at one tensor
    references.py  which fields name models, `model+lora`, local paths
    resolve.py     resolve: Hub ids, `model+lora` and adapters -> what each input reads (before planning)

docs/recipes.md describes the format.
"""

from __future__ import annotations

from mergelab.recipe.load import MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH, MAX_RECIPE_VALUES, field_path, load_recipe
from mergelab.recipe.model import AdapterEntry, ModelEntry, OutputSlice, Recipe, SliceEntry, Source, SourceEntry
from mergelab.recipe.params import evaluate_setting
from mergelab.recipe.resolve import ModelInput, ResolvedInputs, resolve

__all__ = ["Recipe", "OutputSlice", "Source", "load_recipe", "evaluate_setting", "resolve", "ResolvedInputs",
           "ModelInput", "ModelEntry", "SourceEntry", "SliceEntry", "AdapterEntry", "field_path",
           "MAX_RECIPE_BYTES", "MAX_RECIPE_VALUES", "MAX_RECIPE_DEPTH"]
