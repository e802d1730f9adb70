"""Extract a LoRA adapter from a fine-tune: truncated SVD of W_ft - W_base per layer.

    delta = W_ft - W_base = U S V^T  ->  B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T

is the best rank-R approximation of each layer's update (Eckart-Young); this is
the job of MergeKit's mergekit-extract-lora. The whole extraction is planned from
the two checkpoints' metadata before any tensor is read: missing tensors, shape
and vocabulary mismatches are one error up front, never a crash hours in. Tensors
a LoRA cannot hold (norms, biases, embeddings without --include-embeddings) are
reported, and stored whole as PEFT `modules_to_save` when asked; none is dropped
silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import torch

from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.writer import TensorInfo
from mergelab.engine import CollectSink, run
from mergelab.errors import MergeError, ShapeMismatch
from mergelab.lora.algebra import split_singular
from mergelab.lora.peft_format import LoraLayer, write_adapter
from mergelab.plan import Job, Plan, TensorRef

__all__ = ["ExtractPlan", "ExtractReport", "plan_extraction", "extract", "extract_layers", "low_rank"]

_EMBED_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")
# GPT-2 style models store Conv1D weights as (in, out).
_CONV1D_MODEL_TYPES = ("gpt2", "gpt_bigcode", "openai-gpt")


@dataclasses.dataclass
class ExtractPlan:
    lora: list[tuple[str, str]]  # (weight name, layout)
    other: list[str]  # tensors a LoRA cannot hold (compared when run; stored or reported)
    problems: list[str]


@dataclasses.dataclass
class ExtractReport:
    out_dir: Path
    layers: list[dict]  # module, rank, energy (share of ||delta||^2 kept)
    saved: list[str]  # stored whole as modules_to_save
    left_out: list[tuple[str, str]]  # (tensor, reason)
    unchanged: int
    seconds: float

    def to_dict(self) -> dict:
        return {"layers": self.layers, "modules_to_save": self.saved,
                "left_out": [{"tensor": t, "reason": r} for t, r in self.left_out],
                "unchanged_tensors": self.unchanged, "seconds": self.seconds}


def _is_embedding(name: str) -> bool:
    return any(m in name for m in _EMBED_MARKERS)


def plan_extraction(ft: Checkpoint, base: Checkpoint, *, include_embeddings: bool = False) -> ExtractPlan:
    """Classify every tensor from metadata alone, and collect every problem."""
    problems, lora, other = [], [], []
    conv1d = (base.config or {}).get("model_type") in _CONV1D_MODEL_TYPES
    for name in ft:
        if name not in base:
            problems.append(f"{ft.path}: tensor {name} is not in the base {base.path}; is BASE the model "
                            "FINETUNED was trained from?")
            continue
        fs, bs = ft.shape(name), base.shape(name)
        if fs != bs:
            vocab = len(fs) == 2 and fs[1:] == bs[1:] and (_is_embedding(name) or "lm_head" in name)
            why = (f"vocabularies differ ({fs[0]} vs {bs[0]} rows); a LoRA cannot change the vocabulary: "
                   "resize the base's embeddings to the fine-tune's tokenizer first") if vocab else \
                "these are different architectures"
            problems.append(f"tensor {name} has shape {fs} in {ft.path} and {bs} in {base.path}: {why}")
            continue
        if not ft.dtype(name).is_floating_point:
            continue
        if name.endswith(".weight") and len(fs) >= 2 and not (_is_embedding(name) and not include_embeddings):
            if _is_embedding(name):
                layout = "embedding"
            elif len(fs) > 2:
                layout = "conv"
            else:
                layout = "transposed" if conv1d else "matrix"
            lora.append((name, layout))
        else:
            other.append(name)
    problems += [f"{base.path}: tensor {n} is not in the fine-tune {ft.path}" for n in base if n not in ft]
    return ExtractPlan(lora, other, problems)


def low_rank(delta: torch.Tensor, rank: int, *, method: str = "auto", sv_epsilon: float = 0.0,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors (B (m, k), A (k, n)) of a 2-D update and the share of ||delta||^2 kept.

    method: "full" (exact SVD), "randomized" (Halko, Martinsson, Tropp 2011,
    arXiv:0909.4061: torch.svd_lowrank with 10 extra columns and 4 power iterations,
    close to optimal and much faster when rank << min(m, n)), or "auto" (randomized
    when 4 (rank + 10) < min(m, n)). Singular values <= sv_epsilon are dropped too.
    """
    total = float(delta.double().pow(2).sum())
    small = min(delta.shape)
    if method == "randomized" or (method == "auto" and 4 * (rank + 10) < small):
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=min(rank + 10, small), niter=4)
        torch.random.set_rng_state(gen_state)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, int((s > sv_epsilon).sum()))
    b, a = split_singular(u[:, :k], s[:k], vh[:k])
    kept = float(s[:k].double().pow(2).sum())
    return b, a, (1.0 if total == 0 else kept / total)


def _to2d(delta: torch.Tensor, layout: str) -> torch.Tensor:
    return delta.T if layout in ("transposed", "embedding") else delta.reshape(delta.shape[0], -1)


def _factorize(module: str, layout: str, rank: int, svd: str, sv_epsilon: float, facts: dict,
               tensors: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A factorize job's fn: the rank-`rank` factors of ft - base (empty when unchanged); `facts[module]`
    records ("unchanged",) or ("factors", energy, weight shape) for the report."""
    ft, base = tensors
    delta = ft.to(device, torch.float32) - base.to(device, torch.float32)
    if not bool(delta.any()):
        facts[module] = ("unchanged",)
        b, a = delta.new_empty(0, 0), delta.new_empty(0, 0)
    else:
        b, a, energy = low_rank(_to2d(delta, layout), rank, method=svd, sv_epsilon=sv_epsilon)
        facts[module] = ("factors", energy, tuple(delta.shape))
    return {f"{module}:B": b, f"{module}:A": a}


def extraction_plan(ft: Checkpoint, base: Checkpoint, plan: ExtractPlan, rank: int, sv_epsilon: float,
                    svd: str, facts: dict) -> Plan:
    """The engine's plan of an extraction: a factorize job per LoRA weight (outputs `<module>:B`,
    `<module>:A`), an observe job per other tensor (compared with the base while it is read)."""
    jobs = []
    for name, layout in plan.lora:
        module, shape = name.removesuffix(".weight"), tuple(ft.shape(name))
        m, n = (shape[1], shape[0]) if layout in ("transposed", "embedding") else (shape[0], math.prod(shape[1:]))
        k = min(rank, m, n)  # at most; the factors may come out of lower rank (sv_epsilon, an unchanged weight)
        outputs = (TensorInfo(f"{module}:B", (m, k), torch.float32), TensorInfo(f"{module}:A", (k, n), torch.float32))
        jobs.append(Job(name=name, shape=shape, dtype=torch.float32, inputs=(TensorRef(0, name), TensorRef(1, name)),
                        op="factorize", outputs=outputs,
                        fn=functools.partial(_factorize, module, layout, rank, svd, sv_epsilon, facts)))
    for name in plan.other:
        jobs.append(Job(name=name, shape=tuple(ft.shape(name)), dtype=ft.dtype(name),
                        inputs=(TensorRef(0, name), TensorRef(1, name)), op="observe"))
    return Plan(None, [ft, base], jobs)


def extract_layers(ft: Checkpoint, base: Checkpoint, plan: ExtractPlan, rank: int, *, sv_epsilon: float = 0.0,
                   svd: str = "auto", device: str = "cpu", save_other: bool = False, show_progress: bool = False):
    """Run a plan through the engine: (module -> LoraLayer, modules_to_save tensors, report rows, left out,
    unchanged count)."""
    facts: dict[str, tuple] = {}
    changed_other: list[str] = []

    def observe(job: Job, rows, tensors, bad) -> None:
        if job.op == "observe" and not torch.equal(tensors[job.inputs[0]], tensors[job.inputs[1]]):
            changed_other.append(job.name)

    sink = CollectSink()
    run(extraction_plan(ft, base, plan, rank, sv_epsilon, svd, facts), sink, observe, device=device,
        show_progress=show_progress)
    layers, rows, left_out = {}, [], []
    unchanged = len(plan.other) - len(changed_other)
    for name, layout in plan.lora:
        module = name.removesuffix(".weight")
        fact = facts[module]
        if fact[0] == "unchanged":
            unchanged += 1
            continue
        a, b = sink.tensors[f"{module}:A"], sink.tensors[f"{module}:B"]
        if b.shape[1] == 0:
            left_out.append((name, f"every singular value of its update is <= sv_epsilon {sv_epsilon}"))
            continue
        layers[module] = LoraLayer(module, a, b, fact[2], "transposed" if layout == "embedding" else layout,
                                   layout == "embedding")
        rows.append({"module": module, "rank": b.shape[1], "energy": fact[1]})
    saved = _modules_to_save(ft, changed_other, set(layers), save_other, left_out, device)
    return layers, saved, rows, left_out, unchanged


def _modules_to_save(ft: Checkpoint, changed: list[str], targets: set[str], save_other: bool,
                     left_out: list, device: str) -> dict[str, torch.Tensor]:
    """The whole modules of changed tensors a LoRA cannot hold, when `save_other` (else they are reported)."""
    whole: list[str] = []
    for name in changed:
        module = name.rsplit(".", 1)[0]
        if not save_other:
            left_out.append((name, "changed, but a LoRA cannot hold it (norm, bias or excluded embedding); "
                                   "store it whole with save_other"))
        elif module in targets:
            left_out.append((name, f"changed, but its module {module} carries a LoRA and cannot also be a "
                                   "modules_to_save entry"))
        else:  # PEFT's modules_to_save replaces the whole module: store all of its tensors
            whole += [n for n in ft if n.rsplit(".", 1)[0] == module and n not in whole]
    if not whole:
        return {}
    jobs = [Job(name=n, shape=tuple(ft.shape(n)), dtype=ft.dtype(n), inputs=(TensorRef(0, n),), op="copy")
            for n in whole]
    sink = CollectSink()
    run(Plan(None, [ft], jobs), sink, device=device)
    return {n: sink.tensors[n] for n in whole}


def extract(finetuned: str | Path, base: str | Path, out: str | Path, *, rank: int, sv_epsilon: float = 0.0,
            include_embeddings: bool = False, save_other: bool = False, svd: str = "auto",
            device: str = "cpu", overwrite: bool = False, show_progress: bool = False) -> ExtractReport:
    """Extract a rank-`rank` PEFT adapter approximating FINETUNED - BASE into `out`.

    Everything is checked before the first tensor is read: both checkpoints open,
    every tensor present in both with one shape, the output free (or `overwrite`).
    The report lists each layer's rank and share of its update's energy kept, the
    tensors stored as modules_to_save and those left out with the reason.
    """
    if rank < 1:
        raise MergeError(f"rank must be at least 1, got {rank}")
    if svd not in ("auto", "full", "randomized"):
        raise MergeError(f"svd must be auto, full or randomized, got {svd!r}")
    from mergelab.device import resolve_device

    resolve_device(device)  # no GPU: one clear error now, not after the validation
    start = time.perf_counter()
    ft, bs = Checkpoint(finetuned), Checkpoint(base)
    plan = plan_extraction(ft, bs, include_embeddings=include_embeddings)
    if plan.problems:
        raise ShapeMismatch("\n".join(plan.problems))
    if not plan.lora:
        raise MergeError(f"{finetuned}: no weight a LoRA can hold (2-D .weight tensors); nothing to extract")
    from mergelab.checkpoint.output import check_output

    out = Path(out)
    check_output(out, kind="folder", inputs=[finetuned, base], overwrite=overwrite, what="adapter folder")
    layers, saved, rows, left_out, unchanged = extract_layers(
        ft, bs, plan, rank, sv_epsilon=sv_epsilon, svd=svd, device=device, save_other=save_other,
        show_progress=show_progress)
    report = ExtractReport(out, rows, sorted(saved), left_out, unchanged, 0.0)
    report.seconds = time.perf_counter() - start
    extra = {"base_model_name_or_path": str(base)}
    write_adapter(out, layers, base_model=str(base), extra_config=extra, modules_to_save=saved,
                  overwrite=overwrite, protected=[finetuned, base], extra_files={"mergelab_extract_report.json":
                                                     json.dumps(report.to_dict(), indent=2) + "\n"})
    return report
