"""The side files of a run whose method keeps per-task data (side outputs: tall_masks, emr).

A FolderSink hands the side tensors its method computed to `side_output_files` when the run finishes,
and writes what it returns beside the weights before the rename into place; task_models.py reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergelab.checkpoint.side_outputs import side_files
from mergelab.errors import MergeError
from mergelab.plan import Plan

FORMAT = 1


def side_output_files(plan: Plan, side: dict[str, dict[str, torch.Tensor]]) -> dict[str, bytes]:
    """The side files of a finished run of `plan` (a method with side outputs): {file name: content}."""
    spec = plan.method
    jobs = [job for job in plan.jobs if job.op == "merge"]
    if not jobs:
        raise MergeError(f"{spec.name}: the merge has no merged tensor, so there are no task models to keep")
    models = [ref.model for ref in jobs[0].inputs]
    for job in jobs:
        if [ref.model for ref in job.inputs] != models or job.base is None:
            raise MergeError(f"{spec.name} keeps one mask per task for every tensor, but tensor {job.name} is "
                             "merged from other models than the first one; give every model every tensor")
    base = plan.checkpoints[jobs[0].base.model]
    paths = [plan.checkpoints[m].path for m in models]
    meta = {
        "format": FORMAT, "method": spec.name,
        "tasks": [{"name": Path(p).name, "path": str(p)} for p in paths],
        "base": {"path": str(base.path)},
        "summary": spec.side_outputs.summary_fn(side, jobs[0].shared),
        "tensors": {job.name: job.shared.model_dump(by_alias=True) if job.shared is not None else {}
                    for job in jobs},
    }
    return side_files(side, meta)
