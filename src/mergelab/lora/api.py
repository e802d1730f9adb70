"""Merging adapter folders: from Python (`merge_adapters`) and from recipes with `adapter:`.

A recipe whose models are PEFT adapter folders and which has `adapter: {rank: R}`
or `adapter: {combine: cat}` is merged here into a PEFT adapter: the adapters are
scanned (names and shapes, every check), then merged module by module through the
engine (lora.adapter_run) and written atomically.
Without `adapter:` (and with `base_model:`) the adapters are applied to the base
as `AppliedLoraCheckpoint`s and merged by the engine like full models.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError, MergeError, RecipeError
from mergelab.lora.adapter_run import adapter_plan, merge_adapter_files
from mergelab.lora.merge import LayerReport
from mergelab.lora.peft_format import AdapterSpec, is_peft_adapter, scan_adapter, write_adapter

__all__ = ["AdapterMergeReport", "merge_adapters", "merge_adapter_recipe", "read_adapters"]


@dataclasses.dataclass
class AdapterMergeReport:
    """What an adapter merge wrote; attribute names shared with the engine's RunReport."""

    out_dir: Path
    layers: list[LayerReport]
    notes: list[str]
    seconds: float
    written: bool = True

    @property
    def tensors(self) -> int:
        return 2 * len(self.layers)

    @property
    def merged(self) -> int:
        return len(self.layers)

    @property
    def copied(self) -> list[tuple[str, str]]:
        return [(n, "") for n in self.notes]

    @property
    def left_out(self) -> list[tuple[str, str, str]]:
        return []

    bytes_read = bytes_written = 0

    def __str__(self) -> str:
        lines = [f"{'merged' if self.written else 'would merge'} {len(self.layers)} adapted layers"
                 + (f" into {self.out_dir}" if self.written else "")]
        lines += [f"  {r.module}: adapters {r.adapters}, {r.path}, rank {r.rank}, energy kept {r.energy:.4f}"
                  for r in self.layers]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _name_tail(name: str | None) -> str | None:
    return None if not name else Path(str(name).rstrip("/")).name


def read_adapters(paths: Sequence[str], base: str | None) -> list[AdapterSpec]:
    """Scan every adapter (config, tensor names and shapes; no factor read), against the base's tensor shapes
    when given; one error lists every problem. The adapters' files stay open: close() them when done."""
    shapes = None
    if base is not None:
        from mergelab.checkpoint.reader import Checkpoint

        with Checkpoint(base) as ck:
            shapes = {n: ck.shape(n) for n in ck}
    problems, specs = [], []
    for p in paths:
        if not is_peft_adapter(p):
            problems.append(f"{p}: not a PEFT adapter folder (no adapter_config.json); every model of an "
                            "adapter merge must be a LoRA adapter")
            continue
        try:
            specs.append(scan_adapter(p, shapes))
        except CheckpointError as exc:
            problems.append(str(exc))
    names = {_name_tail(i.base_model) for i in specs} - {None}
    if len(names) > 1:
        problems.append("the adapters were trained on different base models ("
                        + ", ".join(f"{i.path}: {i.base_model}" for i in specs) + "); merge adapters of one base")
    if problems:
        close(specs)
        raise CheckpointError("\n".join(problems))
    return specs


def close(specs: Sequence[AdapterSpec]) -> None:
    """Close the adapters' files (read_adapters opens them)."""
    for spec in specs:
        spec.checkpoint.close()


def _notes(infos: Sequence[AdapterSpec], reports: Sequence[LayerReport]) -> list[str]:
    return [f"{r.module} is adapted by {len(r.adapters)} of {len(infos)} adapters "
            f"({', '.join(str(infos[i].path) for i in r.adapters)}): merged over those"
            for r in reports if len(r.adapters) < len(infos)]


def merge_adapters(adapters: Sequence[str], out: str | Path, *, method: str = "linear", rank: int | None = None,
                   combine: str = "svd", base: str | None = None, seed: int | None = None,
                   align: str | None = None, overwrite: bool = False, **params: Any) -> AdapterMergeReport:
    """Merge PEFT adapter folders into one PEFT adapter at `out`.

    Args:
        adapters: adapter folders trained on the same base.
        method: any mergelab method (`mergelab.methods()`); the updates s_i B_i A_i are its inputs.
        rank: R for combine="svd": the best rank-R approximation of the merged update.
        combine: "svd" or "cat" (exact concatenation; linear-type methods).
        base: the base model, to check every adapted module against it (optional).
        align: None, or "knots" (merge in the adapters' shared SVD basis, arXiv:2410.19735).
        **params: the method's parameters, scalars or one value per adapter (as merge_tensors).
    """
    from mergelab.checkpoint.output import check_output

    start = time.perf_counter()
    inputs = [*adapters, *([base] if base else [])]
    check_output(out, kind="folder", inputs=inputs, overwrite=overwrite, what="adapter folder")
    infos = read_adapters([str(a) for a in adapters], base)
    try:
        layers, reports = merge_adapter_files(infos, method, combine=combine, rank=rank, seed=seed, align=align,
                                              **params)
    finally:
        close(infos)
    write_adapter(out, layers, base_model=base or infos[0].base_model, overwrite=overwrite, protected=inputs)
    return AdapterMergeReport(Path(out), reports, _notes(infos, reports), time.perf_counter() - start)


def _recipe_params(rec, spec, models: list[str], num_layers: int):
    """params_for(module, indices) resolving the recipe's settings for each module's weight."""
    from mergelab.checkpoint.reader import layer_index
    from mergelab.methods import spellings

    mkeys, skeys = spellings(spec.model_params), spellings(spec.shared_params)

    def params_for(module: str, idx: list[int]) -> Mapping[str, Any]:
        name = f"{module}.weight"
        layer = layer_index(name)
        t = 0.0 if layer is None else (layer / (num_layers - 1) if num_layers > 1 else 1.0)
        per = [{k: v for k, v in rec.parameters_for(name, t, models[i]).items() if k in mkeys} for i in idx]
        out: dict[str, Any] = {k: v for k, v in rec.parameters_for(name, t, None).items() if k in skeys}
        for key in {k for d in per for k in d}:
            if any(key not in d for d in per):
                raise RecipeError(f"parameter {key} is set for some models and not others at {name}; "
                                  "set it for every model (or globally under `parameters:`)")
            out[key] = [d[key] for d in per]
        return out

    return params_for


def merge_adapter_recipe(rec, out_dir: str | Path, *, seed: int | None = None, overwrite: bool = False,
                         dry_run: bool = False) -> AdapterMergeReport:
    """Run a validated recipe with `adapter:` (its models are PEFT adapter folders)."""
    if rec.slices:
        raise RecipeError("adapter: merging adapters takes `models:`, not `slices:`", rec.source_name)
    base = rec.base
    models = [s.model for s in rec.output_slices()[0].sources if s.model != base]
    start = time.perf_counter()
    infos = read_adapters(models, base)
    try:
        return _run_recipe(rec, infos, models, out_dir, seed, overwrite, dry_run, start)
    finally:
        close(infos)


def _run_recipe(rec, infos: list[AdapterSpec], models: list[str], out_dir: str | Path, seed: int | None,
                overwrite: bool, dry_run: bool, start: float) -> AdapterMergeReport:
    from mergelab.checkpoint.reader import layer_index

    seen = [layer_index(f"{m}.weight") for i in infos for m in i.factors]
    num_layers = 1 + max([i for i in seen if i is not None], default=0)
    combine, rank = rec.adapter.combine, rec.adapter.rank
    if combine == "svd" and rank is None:
        raise RecipeError("adapter: give `rank: R` (best rank-R approximation) or `combine: cat`", rec.source_name)
    options = dict(combine=combine, rank=rank, seed=seed if seed is not None else rec.seed, align=rec.adapter.align,
                   params_for=_recipe_params(rec, rec.method, models, num_layers))
    if dry_run:  # every module's parameters resolve and every check passes, nothing is read
        adapter_plan(infos, rec.merge_method, params={}, facts={}, **options)
        return AdapterMergeReport(Path(out_dir), [], [], time.perf_counter() - start, written=False)
    from mergelab.checkpoint.output import check_output

    base = rec.base
    inputs = [*models, *([base] if base else [])]
    check_output(out_dir, kind="folder", inputs=inputs, overwrite=overwrite, what="adapter folder")
    layers, reports = merge_adapter_files(infos, rec.merge_method, **options)
    write_adapter(out_dir, layers, base_model=rec.base_model or infos[0].base_model, overwrite=overwrite,
                  protected=inputs)
    return AdapterMergeReport(Path(out_dir), reports, _notes(infos, reports), time.perf_counter() - start)
