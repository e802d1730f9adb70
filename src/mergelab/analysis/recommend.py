"""What an InspectReport suggests: which merge method fits these models, and why (`recommend`).

The thresholds below are the lines the advice draws; each says what it separates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mergelab.analysis.group_stats import GroupStats

if TYPE_CHECKING:  # inspect imports nothing from here, but annotations name its report
    from mergelab.analysis.inspect import InspectReport

LINEAR_MIN_COSINE = 0.9
"""Mean pairwise task-vector cosine above which the models moved in nearly one direction:
a plain average (linear) keeps almost all of each task vector, nothing to resolve."""

CLOSE_MODELS_MIN_WEIGHT_COSINE = 0.9
"""Without a base: mean pairwise cosine of the weights above which the models are close
enough that linear (or slerp, for two) is the natural merge."""

SHARED_ORIGIN_MIN_WEIGHT_COSINE = 0.5
"""Without a base: below this weight cosine the models look trained from different
initialisations, whose average usually fails unless their units are aligned first."""

SIGN_CONFLICT_HIGH = 0.5
"""Trimmed sign-conflict rate in the MLP layers, as a share of the chance rate (independent
random signs), at or above which sign election (ties, dare_ties) is worth it: 0.5 is about
the conflict rate of Gaussian task vectors with cosine 0.7, where cancellation under a
plain sum starts to cost."""

OVERLAP_HIGH = 0.3
"""Excess spectral overlap (0: random subspaces, 1: identical) at or above which the tasks
share singular directions, the interference TSV and Iso-CTS are designed to remove."""

OVERLAP_LOW = 0.1
"""Excess spectral overlap at or below which task subspaces are nearly orthogonal, so task
vectors add with little interference and task_arithmetic is enough."""


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _recommend_without_base(r: InspectReport) -> list[str]:
    cos = r.overall.mean_weight_cosine
    extra = ("give base= (the model they were fine-tuned from) for task-vector diagnostics and for "
             "ties / dare_ties / tsv / task_arithmetic, which need it")
    if cos is not None and cos >= CLOSE_MODELS_MIN_WEIGHT_COSINE:
        first = (f"linear (or slerp for two models): mean weight cosine {cos:.3f} >= "
                 f"{CLOSE_MODELS_MIN_WEIGHT_COSINE}; the models are close, a weight average should hold")
    elif cos is not None and cos < SHARED_ORIGIN_MIN_WEIGHT_COSINE:
        first = (f"do not average as is: mean weight cosine {cos:.3f} < {SHARED_ORIGIN_MIN_WEIGHT_COSINE}; the "
                 "models look trained from different starts, align their units (permutation alignment) first")
    else:
        first = (f"linear or slerp, with care: mean weight cosine {cos if cos is None else round(cos, 3)} is "
                 "moderate; check the merge on data (`mergelab analyze` barrier) before trusting it")
    return [first, extra]


def recommend(report: InspectReport) -> list[str]:
    """Merge methods suggested by an inspect report, most suitable first, each with its reason.

    Rules (thresholds are the module constants above):
      * mean task-vector cosine >= LINEAR_MIN_COSINE: linear.
      * trimmed sign-conflict rate of the MLP tensors (all tensors if no MLP is
        recognised) >= SIGN_CONFLICT_HIGH x chance: ties or dare_ties.
      * excess spectral overlap >= OVERLAP_HIGH: tsv or iso_cts; <= OVERLAP_LOW: task_arithmetic.
      * none of these: task_arithmetic as the default, tuned by its scaling curve.
    Without a base only weight cosines are meaningful: linear/slerp, or a warning.
    """
    if report.reference != "base":
        return _recommend_without_base(report)
    o = report.overall
    if len(o.task_norm) < 2:
        return ["task_arithmetic: one fine-tune, nothing to reconcile; tune its scale with a scaling curve"]
    out = []
    cos = o.mean_task_cosine
    if cos is not None and cos >= LINEAR_MIN_COSINE:
        out.append(f"linear: mean task-vector cosine {cos:.3f} >= {LINEAR_MIN_COSINE}; the fine-tunes moved "
                   "in nearly the same direction, so plain averaging is enough")
    mlp = report.kinds.get("mlp", o)
    ratio = mlp.trimmed_conflict_ratio
    if ratio is not None and ratio >= SIGN_CONFLICT_HIGH:
        where = "MLP layers" if "mlp" in report.kinds else "tensors"
        out.append(f"ties or dare_ties: after trimming to density {report.density}, {percent(mlp.sign_conflict_trimmed)}"
                   f" of contested coordinates in the {where} disagree in sign ({ratio:.2f} x chance, threshold "
                   f"{SIGN_CONFLICT_HIGH}); electing a sign keeps them from cancelling"
                   f"{_density_hint(o)}")
    excess = o.excess_overlap
    if excess is not None and excess >= OVERLAP_HIGH:
        out.append(f"tsv or iso_cts: task subspaces overlap (mean top-k overlap {o.mean_spectral_overlap:.2f}, "
                   f"{excess:.2f} above chance on a 0-1 scale, threshold {OVERLAP_HIGH}); decorrelating or "
                   "isotropising the shared singular directions reduces interference")
    elif excess is not None and excess <= OVERLAP_LOW:
        out.append(f"task_arithmetic: task subspaces barely overlap (excess overlap {excess:.2f} <= {OVERLAP_LOW});"
                   " the task vectors add with little interference")
    if not out:
        out.append("task_arithmetic: no strong signal (moderate cosine, few sign conflicts, moderate overlap); "
                   "start from a scaled sum and pick lambda with `mergelab analyze` scaling curves")
    return out


def _density_hint(o: GroupStats) -> str:
    parts = []
    for d, vals in o.mass_kept.items():
        vals = [v for v in vals if v is not None]
        if vals:
            parts.append(f"{d} keeps {percent(sum(vals) / len(vals))}")
    return "; trimming to density " + ", ".join(parts) + " of the task-vector L1 mass" if parts else ""


# ----------------------------------------------------------------------------- rendering


def short_names(labels: Sequence[str]) -> list[str]:
    """Last path component of each label when those are unique, else the labels as given."""
    leaves = [Path(label).name or label for label in labels]
    return leaves if len(set(leaves)) == len(leaves) else list(labels)
