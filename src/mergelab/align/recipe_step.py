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

__all__ = ["aligned_recipe_inputs"]


@contextlib.contextmanager
def aligned_recipe_inputs(rec, out_dir: str | Path) -> Iterator[dict[str, str]]:
    """Align the recipe's models to its reference; yields {resolved model path: aligned copy} and cleans up.

    The recipe's resolved paths are pointed at the aligned copies for the
    duration of the block (and restored after).
    """
    from mergelab.align.files import align_checkpoints

    reference = rec.base or rec.output_slices()[0].sources[0].model
    models = [m for m in rec.input_paths() if m != reference and m != rec.tokenizer_source_path()]
    workdir = partial_path(Path(out_dir).expanduser().resolve().with_name(Path(out_dir).name + "-aligned"))
    saved = dict(rec._paths)
    aligned: dict[str, str] = {}
    try:
        workdir.mkdir(parents=True)
        for i, model in enumerate(models):
            target = workdir / f"model-{i}"
            align_checkpoints(reference, model, target, method="weight_matching")
            aligned[model] = str(target)
        for ref, path in list(rec._paths.items()):
            if path in aligned:
                rec._paths[ref] = aligned[path]
        yield aligned
    finally:
        rec._paths.clear()
        rec._paths.update(saved)
        shutil.rmtree(workdir, ignore_errors=True)
