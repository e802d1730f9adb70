"""One work item's output: the job's op run on its inputs (a method through run_method, or the job's fn)."""

from __future__ import annotations

import warnings

import torch

from mergelab.checkpoint.side_outputs import tensor_digest
from mergelab.engine.inputs import Inputs
from mergelab.engine.items import Rows
from mergelab.methods import PerModel, run_method
from mergelab.methods.seeding import make_generator
from mergelab.plan import Job, Plan


def _fit_vocab(t: torch.Tensor, fill: torch.Tensor | None, want: int) -> torch.Tensor:
    """Cut or pad a vocabulary-indexed tensor's rows to `want` rows (pad from the tokenizer source)."""
    if t.shape[0] == want:
        return t
    if t.shape[0] > want:
        return t[:want]
    assert fill is not None
    return torch.cat([t, fill[t.shape[0]:want].to(t.dtype)], dim=0)


def _method_inputs(job: Job, inputs: Inputs, device: torch.device
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(xs, base): the models' tensors and the base's, as stored, on `device`, vocabularies fitted."""
    tensors = inputs.tensors
    fill = tensors.get(job.vocab_fill) if job.vocab_fill is not None else None

    def fit(t: torch.Tensor) -> torch.Tensor:
        t = _fit_vocab(t, fill, job.vocab_rows) if job.vocab_rows is not None else t
        return t.to(device)

    if job.vocab is not None:  # rows matched by token into the output vocabulary (mergelab.tokenizer)
        ins = [tensors[r] for r in job.inputs] + ([tensors[job.base]] if job.base is not None else [])
        moved = [t.to(device) for t in job.vocab.apply(ins)]
        return moved[:len(job.inputs)], moved[len(job.inputs)] if job.base is not None else None
    return [fit(tensors[r]) for r in job.inputs], fit(tensors[job.base]) if job.base is not None else None


def _run_fn(job: Job, inputs: Inputs, device: torch.device) -> dict[str, torch.Tensor]:
    """factorize / permute / expert: the job's fn on its inputs (refs() order, on device), outputs on CPU."""
    tensors = [inputs.tensors[r].to(device) for r in job.refs()]
    inputs.tensors.clear()
    out = job.fn(tensors, device)
    if isinstance(out, torch.Tensor):
        out = {job.name: out}
    want = {info.name: info for info in job.layout}
    if set(out) != set(want):
        raise AssertionError(f"job {job.name} ({job.op}) made {sorted(out)}, its layout is {sorted(want)}")
    return {name: t.to(dtype=want[name].dtype).cpu() for name, t in out.items()}


def compute(plan: Plan, job: Job, inputs: Inputs, device: torch.device, seed: int | None, chunk: Rows,
            notes: dict[str, list[str]] | None = None, side: dict | None = None) -> dict[str, torch.Tensor]:
    """The outputs of one work item: {output name: tensor on CPU in its dtype} ({} for observe jobs).

    Warnings the method raises are added to `notes[job.name]` (for the run's report); the job is not
    changed. For a method with side outputs, `side[job.name]` gets its side tensors (on CPU) and the
    base tensor's digest `base_sha1`.
    """
    if job.op == "observe":
        return {}
    if job.op == "copy":
        t = inputs.tensors[job.inputs[0]]
        return {job.name: (job.vocab.apply([t])[0] if job.vocab is not None else t).to(job.dtype)}
    if job.op != "merge":
        return _run_fn(job, inputs, device)
    spec, cdtype = plan.method, plan.compute_dtype
    xs, base = _method_inputs(job, inputs, device)
    stats = {}
    if spec.needs_stats:
        stats["stats"] = None if job.stats is None else torch.stack(
            [inputs.tensors[r].to(device=device, dtype=cdtype) for r in job.stats])
    if job.base_stats is not None:
        stats["base_stats"] = inputs.tensors[job.base_stats].to(device=device, dtype=cdtype)
    inputs.tensors.clear()
    gen = None
    if spec.randomized:
        key = job.name if chunk is None else f"{job.name}[{chunk[0]}:{chunk[1]}]"
        gen = make_generator(seed, key, device)
    extra = {} if side is not None and spec.side_outputs is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = run_method(spec, xs, base, PerModel(job.model_params), job.shared, gen, out_dtype=job.dtype,
                            compute_dtype=cdtype, side=extra, **stats)
    if extra is not None:
        if base is not None:
            extra["base_sha1"] = tensor_digest(base)
        side[job.name] = {key: t.cpu() for key, t in extra.items()}
    for w in caught:  # e.g. metric entries floored: kept in the report, not just printed
        note = f"{spec.name}: {w.message}"
        if notes is not None and note not in notes.setdefault(job.name, []):
            notes[job.name].append(note)
    return {job.name: merged.cpu()}
