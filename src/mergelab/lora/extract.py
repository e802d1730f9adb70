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
import json
import time
from pathlib import Path

import torch

from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import MergeError, ShapeMismatch
from mergelab.lora.algebra import split_singular
from mergelab.lora.peft_format import LoraLayer, write_adapter

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


def extract_layers(ft: Checkpoint, base: Checkpoint, plan: ExtractPlan, rank: int, *, sv_epsilon: float = 0.0,
                   svd: str = "auto", device: str = "cpu", save_other: bool = False, show_progress: bool = False):
    """Run a plan: (module -> LoraLayer, modules_to_save tensors, report rows, left out, unchanged count)."""
    from mergelab.progress import ByteProgress

    layers, saved, rows, left_out, unchanged = {}, {}, [], [], 0
    dev = torch.device(device)
    total = sum(ft.nbytes(n) + base.nbytes(n) for n, _ in plan.lora) + sum(ft.nbytes(n) for n in plan.other)
    with ByteProgress(len(plan.lora) + len(plan.other), total, enabled=show_progress, label="extracting") as bar:
        for name, layout in plan.lora:
            delta = ft[name].to(dev, torch.float32) - base[name].to(dev, torch.float32)
            bar.advance(ft.nbytes(name) + base.nbytes(name))
            if not bool(delta.any()):
                unchanged += 1
                continue
            b, a, energy = low_rank(_to2d(delta, layout), rank, method=svd, sv_epsilon=sv_epsilon)
            module = name.removesuffix(".weight")
            if b.shape[1] == 0:
                left_out.append((name, f"every singular value of its update is <= sv_epsilon {sv_epsilon}"))
                continue
            layers[module] = LoraLayer(module, a.cpu(), b.cpu(), tuple(delta.shape),
                                       "transposed" if layout == "embedding" else layout, layout == "embedding")
            rows.append({"module": module, "rank": b.shape[1], "energy": energy})
        changed_other = []
        for name in plan.other:
            bar.advance(ft.nbytes(name))
            if torch.equal(ft[name], base[name]):
                unchanged += 1
            else:
                changed_other.append(name)
    targets = set(layers)
    for name in changed_other:
        module = name.rsplit(".", 1)[0]
        if not save_other:
            left_out.append((name, "changed, but a LoRA cannot hold it (norm, bias or excluded embedding); "
                                   "store it whole with save_other"))
        elif module in targets:
            left_out.append((name, f"changed, but its module {module} carries a LoRA and cannot also be a "
                                   "modules_to_save entry"))
        else:  # PEFT's modules_to_save replaces the whole module: store all of its tensors
            for full in [n for n in ft if n.rsplit(".", 1)[0] == module]:
                saved[full] = ft[full]
    return layers, saved, rows, left_out, unchanged


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
