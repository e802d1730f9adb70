"""The recipe key `align: weight_matching`: bring every model into the reference's basis before merging.

The reference is the recipe's base model, or else its first model. Each other
model is aligned by weight matching (Git Re-Basin, Ainsworth et al. 2022,
arXiv:2209.04836) with the permutation spec of its Hugging Face config, and
written to a hidden temporary folder beside the output; the merge then reads
those copies, and the folder is removed when the merge ends. Activation
matching needs data, so recipes offer weight matching only (`mergelab align
A B OUT --method activation --data ...` does the other).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from mergelab.checkpoint.output import partial_path
from mergelab.recipe import Recipe

__all__ = ["aligned_recipe_inputs"]


@contextlib.contextmanager
def aligned_recipe_inputs(rec: Recipe, out_dir: str | Path) -> Iterator[Recipe]:
    """Align the recipe's models to its reference; yields the recipe with its model paths pointed at
    the aligned copies, and removes the copies after the block."""
    from mergelab.align.files import align_checkpoints

    reference = rec.base or rec.output_slices()[0].sources[0].model
    models = [m for m in rec.input_paths() if m != reference and m != rec.tokenizer_source_path()]
    workdir = partial_path(Path(out_dir).expanduser().resolve().with_name(Path(out_dir).name + "-aligned"))
    aligned: dict[str, str] = {}
    try:
        workdir.mkdir(parents=True)
        for i, model in enumerate(models):
            target = workdir / f"model-{i}"
            align_checkpoints(reference, model, target, method="weight_matching")
            aligned[model] = str(target)
        yield rec.located({ref: aligned[path] for ref, path in rec.paths.items() if path in aligned})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
