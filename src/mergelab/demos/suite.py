"""Accuracy against the number of tasks: every registered merging method on every subset of a task suite.

A suite is a base model, one fine-tune per task and the statistics the data-aware
methods need (a ``built`` dict shaped like :func:`mergelab.demos.digits.build_models`'
result). For each subset of tasks (2, 3, ... of them), every method merges the
subset's models and the merged model is scored on the subset's tasks: the average
accuracy, and the normalised accuracy (mean over the subset of merged accuracy /
the task's own fine-tune's accuracy). The method list is whatever
``mergelab.methods()`` holds among :data:`CANDIDATES`, so a method joins the suite
as soon as it is registered.

Used by examples/fusion_suite.py (the digits suite) and examples/minilm_tasks4.py.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mergelab
from mergelab.demos import digits

# (label, method, parameters) at each paper's defaults: the digits demo's merges (see digits.MERGES
# for where each value comes from), Model Stock (no parameter), then the issue-24 methods with their
# registered defaults (their papers': MagMax lambda 0.5, WUDI 300 Adam steps at lr 1e-5, ...).
NEW_METHODS = ("magmax", "wudi", "pcb", "tall_masks", "emr", "regmean_plusplus", "adamerging")
CANDIDATES: list[tuple[str, str, dict[str, Any]]] = [
    *digits.MERGES, ("model_stock", "model_stock", {}), *[(m, m, {}) for m in NEW_METHODS]]

# which entry of ``built`` a statistics-using method reads, where digits.merge_kwargs does not say
STATS_OF = {"fisher": "fisher", "regmean": "gram", "optimizer_aware": "optimizer"}


def registered_merges(overrides: dict[str, dict[str, Any]] | None = None,
                      only: Sequence[str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """CANDIDATES whose method is registered now (optionally only the labels in ``only``), with overrides."""
    have = mergelab.methods()
    out = []
    for label, method, params in CANDIDATES:
        if method in have and (only is None or label in only):
            out.append((label, method, {**params, **(overrides or {}).get(label, {})}))
    return out


def subset_built(built: dict[str, Any], idx: Sequence[int]) -> dict[str, Any]:
    """The models and per-model statistics of the tasks ``idx``; shared entries as they are."""
    per_model = ("models", "fisher", "gram", "optimizer", "plusplus_data")
    return {k: ([v[i] for i in idx] if k in per_model and v is not None else v) for k, v in built.items()}


def suite_kwargs(method: str, params: dict[str, Any], built: dict[str, Any], seed: int) -> dict[str, Any]:
    """merge_state_dicts arguments: digits.merge_kwargs, plus what a method it does not know needs."""
    info = mergelab.methods()[method]
    kw = digits.merge_kwargs(method, params, built, seed)
    for name, spec in info["parameters"].items():  # a required per-model weight: 1 (the paper's sum)
        if spec["required"] and name not in kw:
            kw[name] = 1.0
    if info["needs_stats"] and "stats" not in kw:
        kw["stats"] = built[STATS_OF.get(method, "gram")]
    if info["uses_base_stats"] and "base_stats" not in kw:
        kw["base_stats"] = built.get("base_fisher")
    if info["base"] == "optional" and "base" not in kw:
        kw["base"] = built["base"].state_dict()
    if info["randomized"]:
        kw.setdefault("seed", seed)
    return kw


def _regmean_plusplus(params: dict[str, Any], built: dict[str, Any]) -> dict:
    """RegMean++ merges block by block, each block's Grams taken on the merged earlier blocks' outputs, so
    it needs each model's data (``built["plusplus_data"]``), not Grams each model computed alone."""
    from mergelab.stats.gram_sequential import regmean_plusplus_stats

    if built.get("plusplus_data") is None:
        raise ValueError("regmean_plusplus needs each model's data batches (built['plusplus_data']) to take "
                         "its Grams on the merged earlier blocks; this suite has none")
    return regmean_plusplus_stats(built["models"], built["plusplus_data"], **params).state_dict


def merge_one(method: str, params: dict[str, Any], built: dict[str, Any], seed: int) -> tuple[Any, float, list]:
    """(merged state dict or the error message, seconds, warnings) of one merge."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            if method == "regmean_plusplus":
                merged: Any = _regmean_plusplus(params, built)
            else:
                kw = suite_kwargs(method, params, built, seed)
                merged = mergelab.merge_state_dicts(method, kw.pop("models"), **kw)
        except Exception as exc:  # a method this suite cannot feed (e.g. one needing its own data)
            merged = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
    return merged, seconds, sorted({str(w.message) for w in caught})


def subsets(tasks: Sequence[str], sizes: Sequence[int]) -> list[tuple[str, ...]]:
    """Every subset of ``tasks`` of each size, in the tasks' order."""
    return [c for k in sizes for c in itertools.combinations(tasks, k)]


def run_subset(subset: Sequence[str], tasks: Sequence[str], built: dict[str, Any], individual: dict[str, float],
               score: Callable[[dict, Sequence[str]], dict[str, float]], seed: int,
               merges: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """One subset of one seed: every merge's per-task accuracy, average, normalised accuracy.

    ``score(state_dict, subset)`` loads a merged state dict and returns its accuracy on each task
    of the subset; ``individual`` holds each task's own fine-tune's accuracy.
    """
    sub = subset_built(built, [list(tasks).index(t) for t in subset])
    out: dict[str, Any] = {}
    for label, method, params in merges:
        merged, seconds, caught = merge_one(method, params, sub, seed)
        if isinstance(merged, str):
            out[label] = {"method": method, "params": params, "error": merged}
            continue
        acc = score(merged, subset)
        out[label] = {"method": method, "params": params, "accuracy": acc, "seconds": seconds, "warnings": caught,
                      "average": sum(acc.values()) / len(acc),
                      "normalized": sum(acc[t] / individual[t] for t in subset) / len(subset)}
    ind = {t: individual[t] for t in subset}
    out["individual"] = {"accuracy": ind, "average": sum(ind.values()) / len(ind), "normalized": 1.0}
    return {"seed": seed, "tasks": list(subset), "merges": out}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    m = _mean(values)
    return (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """label -> number of tasks -> mean and std over seeds of the per-seed mean over subsets.

    Keys: ``average``/``average_std``, ``normalized``/``normalized_std``, ``seeds``, ``subsets``.
    A merge that failed on any subset is left out at that size.
    """
    cells: dict[tuple[str, int], dict[int, list]] = {}
    for rec in records:
        for label, r in rec["merges"].items():
            cells.setdefault((label, len(rec["tasks"])), {}).setdefault(rec["seed"], []).append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (label, k), by_seed in cells.items():
        if any("error" in r for rs in by_seed.values() for r in rs):
            continue
        row = {"seeds": len(by_seed), "subsets": len(next(iter(by_seed.values())))}
        for key in ("average", "normalized"):
            per_seed = [_mean([r[key] for r in rs]) for rs in by_seed.values()]
            row[key], row[key + "_std"] = _mean(per_seed), _std(per_seed)
        out.setdefault(label, {})[str(k)] = row
    return out


def errors(records: list[dict[str, Any]]) -> dict[str, str]:
    """label -> the first error message of a merge that could not run."""
    out: dict[str, str] = {}
    for rec in records:
        for label, r in rec["merges"].items():
            if "error" in r:
                out.setdefault(label, r["error"])
    return out


def markdown_table(summary: dict[str, dict[str, dict[str, float]]], title: str) -> str:
    """One row per method: average accuracy and normalised accuracy (± std over seeds) per number of tasks."""
    sizes = sorted({k for row in summary.values() for k in row}, key=int)
    head = "| method | " + " | ".join(f"avg acc, {k} tasks | norm. acc, {k} tasks" for k in sizes) + " |"
    lines = [f"**{title}**", "", head, "|---|" + "---:|---:|" * len(sizes)]
    order = sorted(summary, key=lambda lb: (lb != "individual", -summary[lb].get(sizes[-1], {}).get("normalized", 0)))
    for label in order:
        cells = []
        for k in sizes:
            r = summary[label].get(k)
            cells += ([f"{r['average']:.3f} ± {r['average_std']:.3f}", f"{r['normalized']:.3f} ± {r['normalized_std']:.3f}"]
                      if r else ["–", "–"])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_normalized(summary: dict[str, dict[str, dict[str, float]]], path: Path, title: str) -> Path:
    """Normalised accuracy against the number of tasks, one line per method, error bars = std over seeds."""
    from mergelab.analysis.plots import figure

    fig = figure((9, 5.5))
    ax = fig.add_subplot()
    for i, (label, row) in enumerate(summary.items()):
        ks = sorted(row, key=int)
        ax.errorbar([int(k) + 0.02 * (i - len(summary) / 2) for k in ks], [row[k]["normalized"] for k in ks],
                    yerr=[row[k]["normalized_std"] for k in ks], marker="o", ms=3, capsize=2,
                    lw=2.5 if label == "individual" else 1.2, ls="-" if i < 10 else "--", label=label)
    ax.set_xticks(sorted({int(k) for row in summary.values() for k in row}))
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("normalised accuracy (merged / individual)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
