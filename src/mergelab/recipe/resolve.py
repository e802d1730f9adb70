"""Input resolution, the stage between a validated recipe and its plan: what each model reference reads.

    resolved = resolve(load_recipe("recipe.yml"), offline=None)
    checkpoints = {path: open_input(inp) for path, inp in resolved.inputs.items()}   # mergelab.lora.applied
    plan = make_plan(resolved.recipe, checkpoints)

Hub ids (`org/name[@revision]`, also either side of MergeKit's `model+lora`)
become their folders in the local Hugging Face cache, downloaded unless offline
(mergelab.checkpoint.hub); a local path that exists always wins. Every input is
then described as the plan reads it: a model as it is, a model with a PEFT
adapter applied on the fly (`model+lora`), or an adapter folder applied to the
recipe's base model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mergelab.checkpoint.hub import parse_hub_reference, resolve_hub_model
from mergelab.checkpoint.peft import is_adapter_folder
from mergelab.errors import CheckpointError, RecipeError
from mergelab.recipe.checks import recipe_problems
from mergelab.recipe.model import Recipe
from mergelab.recipe.references import references, split_lora_reference

__all__ = ["ModelInput", "ResolvedInputs", "resolve"]


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """One checkpoint a merge reads, under the path the recipe and the plan know it by.

    `model` is the full model read (None: an adapter folder with no `base_model:` to apply it to);
    `adapter`, a PEFT adapter folder applied to it on the fly (None: the model as it is).
    """

    path: str
    model: str | None
    adapter: str | None = None


@dataclasses.dataclass(frozen=True)
class ResolvedInputs:
    """A recipe whose references point at local paths, and every input it reads.

    `inputs` maps each model path (Recipe.input_paths()), then each statistics path, in that
    order (the plan's model indices follow it), to what is opened for it.
    """

    recipe: Recipe
    inputs: dict[str, ModelInput]


def resolve(recipe: Recipe, *, offline: bool | None = None) -> ResolvedInputs:
    """Resolve a validated recipe's inputs to local paths and describe each (see the module docstring).

    Args:
        offline: resolve Hub ids from the local cache only; None: as HF_HUB_OFFLINE says.

    Raises:
        RecipeError: one problem per Hub id that cannot be found (naming its field and how to get
            it), or the recipe's problems once its Hub ids point at their folders.
    """
    found, problems = _hub_paths(recipe, offline)
    if problems:
        raise RecipeError(problems, recipe.source_name)
    if found:
        recipe = recipe.located(found)
        problems = recipe_problems(recipe)  # what depends on what the Hub models are
        if problems:
            raise RecipeError(problems, recipe.source_name)
    return ResolvedInputs(recipe, {path: describe_input(path, recipe.base) for path in _read_paths(recipe)})


def describe_input(path: str, base_model: str | None) -> ModelInput:
    """What is opened for one resolved input path: `model+adapter`, an adapter folder applied to
    `base_model`, or the model itself."""
    lora = split_lora_reference(path)
    if lora is not None:
        return ModelInput(path, *lora)
    if is_adapter_folder(path):
        return ModelInput(path, base_model, path)
    return ModelInput(path, path)


def _read_paths(r: Recipe) -> list[str]:
    """Every distinct path a merge opens: the models, then their statistics, then the base's."""
    stats = [src.stats for sl in r.output_slices() for src in sl.sources if src.stats]
    if r.base_stats:
        stats.append(r.resolve(r.base_stats))
    return list(dict.fromkeys([*r.input_paths(), *stats]))


def _hub_paths(r: Recipe, offline: bool | None) -> tuple[dict[str, str], list[str]]:
    """{reference: path} for every reference that is no local path but a Hub id (also either side
    of model+lora), resolved to its folder in the Hub cache, downloading it unless offline; and
    one problem per id that failed."""
    found: dict[str, str] = {}
    out: list[str] = []
    failed: set[str] = set()
    for where, ref in references(r):
        path = found.get(ref) or r.resolve(ref)
        if Path(path).exists():
            continue  # a local path that exists always wins over a Hub id
        raw = split_lora_reference(ref) or (ref,)
        resolved = list(split_lora_reference(path) or (path,))
        if len(raw) != len(resolved):
            continue
        for i, part in enumerate(raw):
            if Path(resolved[i]).exists() or part in failed or parse_hub_reference(part) is None:
                continue
            try:
                resolved[i] = resolve_hub_model(part, offline=offline)
            except CheckpointError as exc:
                failed.add(part)
                out.append(f"{where}: {exc}")
        if "+".join(resolved) != path:
            found[ref] = "+".join(resolved)
    return found, out
