"""Each task's model from a merge that keeps per-task side data (tall_masks, emr).

Writing: a FolderSink gives `engine.side_files.side_output_files(plan, side)` the side tensors its method computed
with every merged tensor; they become task_models.safetensors / task_models.json in the output
folder (checkpoint/side_outputs.py), written with the model before it is renamed into place.

Reading: `task_model(merged_dir, task, base=...)` (a state dict) and `write_task_model(...)` (a
checkpoint folder) stream a plan through engine.run: one rebuild job per merged tensor (the
method's SideOutputs.rebuild_fn on the merged tensor, the base's and the side tensors; the base
tensor's SHA-1 must be the one recorded), one copy job per other tensor.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.side_outputs import SIDE_META, SIDE_TENSORS, read_side, tensor_digest
from mergelab.errors import CheckpointError, MergeError
from mergelab.engine.side_files import side_output_files
from mergelab.plan import Job, OutputSpec, Plan, TensorRef

__all__ = ["side_output_files", "task_model", "write_task_model", "task_names"]


def task_names(merged_dir: str | Path) -> list[str]:
    """The names of the tasks a merged folder can rebuild (its models' folder names)."""
    return [t["name"] for t in read_side(merged_dir)[1]["tasks"]]


def _task_index(meta: dict, task: str | int, where: Path) -> int:
    tasks = meta["tasks"]
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(tasks):
        return task
    for i, entry in enumerate(tasks):
        if str(task) in (entry["name"], entry["path"]):
            return i
    listed = ", ".join(t["name"] for t in tasks)
    raise MergeError(f"{where / SIDE_META} has no task {task!r}; its tasks are {listed} "
                     f"(or their index 0-{len(tasks) - 1})")


def _rebuild(rebuild_fn, side: dict, info: dict, task: int, name: str, base_path: str, dtype: torch.dtype,
             tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A rebuild job's fn: task `task`'s tensor `name` from [merged, base], checking the base's digest."""
    merged, base = tensors
    if not torch.equal(tensor_digest(base), side["base_sha1"]):
        raise CheckpointError(f"{base_path}: tensor {name} is not the one the merge used (its SHA-1 differs from "
                              f"the one in {SIDE_TENSORS}); pass the merge's base model")
    return rebuild_fn(merged.float(), base.float(), side, info, task).to(dtype)


def _task_plan(merged_dir: str | Path, task: str | int, base: str | Path | None) -> Plan:
    merged_dir = Path(merged_dir)
    side, meta = read_side(merged_dir)
    from mergelab.methods import get_method

    spec = get_method(meta["method"])
    index = _task_index(meta, task, merged_dir)
    base_path = Path(base) if base is not None else Path(meta["base"]["path"])
    if not base_path.exists():
        given = "" if base is not None else f" (recorded in {merged_dir / SIDE_META})"
        raise CheckpointError(f"the base model {base_path}{given} does not exist; pass the merge's base model "
                              "(base=...)", option="base")
    merged, base_ck = Checkpoint(merged_dir), Checkpoint(base_path)
    jobs = []
    for name in merged:
        shape, dtype = merged.shape(name), merged.dtype(name)
        if name not in side:
            jobs.append(Job(name=name, shape=shape, dtype=dtype, inputs=(TensorRef(0, name),), op="copy"))
            continue
        if name not in base_ck or base_ck.shape(name) != shape:
            raise CheckpointError(f"{base_path}: the base model has no tensor {name} of shape {shape}; pass the "
                                  "merge's base model", option="base")
        info = {"params": meta["tensors"].get(name, {}), "summary": meta["summary"]}
        fn = functools.partial(_rebuild, spec.side_outputs.rebuild_fn, side[name], info, index, name,
                               str(base_path), dtype)
        jobs.append(Job(name=name, shape=shape, dtype=dtype, inputs=(TensorRef(0, name),), base=TensorRef(1, name),
                        op="rebuild", fn=fn))
    return Plan(method=None, checkpoints=[merged, base_ck], jobs=jobs, output=OutputSpec(assets_from=merged))


def task_model(merged_dir: str | Path, task: str | int, *, base: str | Path | None = None,
               device: str = "cpu") -> dict[str, torch.Tensor]:
    """Task `task`'s model (name, path or index) rebuilt from a tall_masks / emr merge: a state dict.

    `base`: the merge's base model (default: the path recorded in task_models.json); its tensors
    must be those the merge used (checked by digest).
    """
    from mergelab.engine import CollectSink, run

    sink = CollectSink()
    run(_task_plan(merged_dir, task, base), sink, device=device)
    return sink.tensors


def write_task_model(merged_dir: str | Path, out_dir: str | Path, task: str | int, *,
                     base: str | Path | None = None, overwrite: bool = False, device: str = "cpu",
                     shard_size: int = 5 * 10**9, show_progress: bool = False):
    """Task `task`'s model as a checkpoint folder at `out_dir` (atomically; config and tokenizer from
    the merged folder). Returns the run report."""
    from mergelab.engine import execute

    return execute(_task_plan(merged_dir, task, base), out_dir, device=device, shard_size=shard_size,
                   overwrite=overwrite, show_progress=show_progress)
