"""Does the effective noise scale predict how well two models merge? An experiment on digits.

Zhang, Theus, Teney, Orvieto, Pang and Mauw (2025), "How does the optimizer
implicitly bias the model merging loss landscape?", arXiv:2510.04686, report that
the merge gain of models trained apart depends on the optimizer mostly through the
effective noise scale S = lr / (B (1 - m)^k), non-monotonically, with a sweet spot.

The experiment here, small enough for two CPU cores:

1. a shared checkpoint: an MLP (64-64-64-10) trained briefly (30 SGD steps) on
   scikit-learn's digits with one fixed configuration, early enough that the
   branches still travel far from it;
2. for every (lr, B, m) of a grid and every seed, two branches copied from it and
   trained with SGD (heavy-ball momentum m, batch B, learning rate lr) on the same
   data in different minibatch orders, for the same number of *examples seen*
   (epochs, not steps), so that batch sizes are compared at equal data and a bigger
   batch means fewer, less noisy steps, as in the SDE view behind S;
3. the pair is merged with mergelab (linear at 0.5, and task arithmetic from the
   shared checkpoint with lambda chosen on a validation split) and the merge is
   scored on a held-out test split: merge gain = merged metric minus the mean of the
   two endpoints' metrics (for the loss: the endpoints' mean minus the merge's, so
   positive is better for both), plus the loss and accuracy barriers along the
   straight path. A pair whose branch ends below `min_accuracy` on the test split
   (or with non-finite weights) counts as failed and is left out of every fit.

"Do the curves line up on S?" is answered with numbers, not only a picture: for
each candidate predictor (lr, B, lr / B, S with k = 1, S with k = 2), the rank
correlation of the merge gain with it, the leave-one-out R^2 of a kernel smoother of the merge gain on log10 of it (how
well one curve of that predictor, of any shape, explains the configurations),
and the R^2 of a quadratic, whose vertex is reported as the sweet spot when the
fit is concave. Failed configurations are left out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mergelab
from mergelab.analysis.evaluators import classifier_evaluator
from mergelab.analysis.noise_scale import effective_noise_scale
from mergelab.analysis.paths import interpolation_path


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The grid and the sizes of the experiment (defaults: the full run, a few minutes on 2 cores)."""

    lrs: Sequence[float] = (0.003, 0.01, 0.03, 0.1, 0.3)
    batches: Sequence[int] = (8, 32, 128)
    momenta: Sequence[float] = (0.0, 0.9)
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    hidden: int = 64
    shared_steps: int = 30  # steps of the shared checkpoint (lr 0.05, B 32, m 0.9): early, so branches travel
    min_accuracy: float = 0.5  # a branch below this test accuracy counts as a failed run
    epochs: float = 20.0  # examples seen per branch, in passes over the training split
    lambdas: Sequence[float] = (0.25, 0.5, 0.75, 1.0)  # task arithmetic's lambda, chosen on validation
    path_points: int = 11
    k: float = 1.0  # power of 1 / (1 - m) in S for the main plot (k = 2 is scored too)


def _data(seed: int) -> dict[str, torch.Tensor]:
    """Digits pixels in [0, 1]: 70% train; the rest split evenly into validation and test."""
    from mergelab.demos.digits import load_digits_split

    d = load_digits_split(seed)
    half = len(d["y_test"]) // 2
    return {"x_train": d["x_train"], "y_train": d["y_train"],
            "x_val": d["x_test"][:half], "y_val": d["y_test"][:half],
            "x_test": d["x_test"][half:], "y_test": d["y_test"][half:]}


def _train_sgd(model: nn.Module, data: dict[str, torch.Tensor], *, lr: float, batch: int, momentum: float,
               steps: int, seed: int) -> bool:
    """SGD with heavy-ball momentum on minibatches drawn by `seed`; False if the loss became non-finite."""
    from mergelab.demos.digits import train

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    train(model, opt, data["x_train"], data["y_train"], steps=steps, batch=batch, seed=seed)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _shared_checkpoint(cfg: SweepConfig, data: dict[str, torch.Tensor], seed: int) -> nn.Module:
    from mergelab.demos.digits import make_mlp

    torch.manual_seed(seed)
    model = make_mlp(cfg.hidden)
    _train_sgd(model, data, lr=0.05, batch=32, momentum=0.9, steps=cfg.shared_steps, seed=10_000 + seed)
    return model


def _score(template: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    template.load_state_dict(state)
    return classifier_evaluator(x, y)(template)


def _pair_row(cfg: SweepConfig, data: dict[str, torch.Tensor], shared: nn.Module, lr: float, batch: int,
              momentum: float, seed: int) -> dict[str, Any]:
    """Train one branch pair under (lr, batch, momentum) and measure its merges."""
    import copy

    steps = max(1, round(cfg.epochs * len(data["y_train"]) / batch))
    row: dict[str, Any] = {"lr": lr, "batch": batch, "momentum": momentum, "seed": seed, "steps": steps,
                           "S": effective_noise_scale(lr, batch, momentum, k=cfg.k),
                           "S_k2": effective_noise_scale(lr, batch, momentum, k=2)}
    branches = []
    for b in range(2):
        model = copy.deepcopy(shared)
        ok = _train_sgd(model, data, lr=lr, batch=batch, momentum=momentum, steps=steps,
                        seed=1000 * seed + 100 * b + 7)
        if not ok:
            return {**row, "failed": True}
        branches.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    template = copy.deepcopy(shared)
    base = {k: v.detach().clone() for k, v in shared.state_dict().items()}
    test = (data["x_test"], data["y_test"])
    ends = [_score(template, sd, *test) for sd in branches]
    if min(e["accuracy"] for e in ends) < cfg.min_accuracy:  # trained into a useless state: no merge to judge
        return {**row, "failed": True, "acc_a": ends[0]["accuracy"], "acc_b": ends[1]["accuracy"]}
    mean_end = {m: (ends[0][m] + ends[1][m]) / 2 for m in ("loss", "accuracy")}
    linear = _score(template, mergelab.merge_state_dicts("linear", branches, weight=[0.5, 0.5]), *test)

    def task_arithmetic(lam: float) -> dict[str, torch.Tensor]:
        return mergelab.merge_state_dicts("task_arithmetic", branches, base=base, weight=[lam, lam])

    best = max(cfg.lambdas, key=lambda lam: _score(template, task_arithmetic(lam), data["x_val"],
                                                   data["y_val"])["accuracy"])
    ta = _score(template, task_arithmetic(best), *test)
    path = interpolation_path(template, branches[0], branches[1], classifier_evaluator(*test),
                              points=cfg.path_points)
    return {**row, "failed": False,
            "acc_a": ends[0]["accuracy"], "acc_b": ends[1]["accuracy"],
            "loss_a": ends[0]["loss"], "loss_b": ends[1]["loss"],
            "acc_linear": linear["accuracy"], "loss_linear": linear["loss"],
            "gain_linear": linear["accuracy"] - mean_end["accuracy"],
            "loss_gain_linear": mean_end["loss"] - linear["loss"],
            "ta_lambda": best, "acc_ta": ta["accuracy"], "gain_ta": ta["accuracy"] - mean_end["accuracy"],
            "loss_barrier": path.barriers["loss"], "acc_barrier": path.barriers["accuracy"]}


def run_sweep(cfg: SweepConfig = SweepConfig(), *, progress: bool = True) -> list[dict[str, Any]]:
    """Every (lr, B, m, seed) of the grid: one row per branch pair (see _pair_row for the fields)."""
    from rich.progress import Progress

    from mergelab.demos.digits import single_thread

    grid = list(itertools.product(cfg.seeds, cfg.lrs, cfg.batches, cfg.momenta))
    rows: list[dict[str, Any]] = []
    with single_thread(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("branch pairs", total=len(grid))
        shared: dict[int, tuple[dict, nn.Module]] = {}
        for seed, lr, batch, momentum in grid:
            if seed not in shared:
                data = _data(seed)
                shared[seed] = (data, _shared_checkpoint(cfg, data, seed))
            data, model = shared[seed]
            rows.append(_pair_row(cfg, data, model, lr, batch, momentum, seed))
            bar.advance(task)
    return rows


def quadratic_r2(x: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
    """(R^2 of y ~ a + b x + c x^2 by least squares, x at the vertex when c < 0, else None)."""
    if len(x) < 4 or float(np.var(y)) == 0:
        return math.nan, None
    design = np.stack([np.ones_like(x), x, x * x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
    peak = float(-coef[1] / (2 * coef[2])) if coef[2] < 0 else None
    return r2, peak


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks of a, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of each distinct value's last copy
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks."""
    if len(x) <= 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(_ranks(np.asarray(x)), _ranks(np.asarray(y)))[0, 1])


def smooth_r2(x: np.ndarray, y: np.ndarray, bandwidth: float = 0.3) -> float:
    """Leave-one-out R^2 of a Gaussian-kernel smoother of y on x (Nadaraya-Watson).

    Measures how well *some* smooth curve of x predicts y, whatever its shape
    (rise then fall, a plateau, a cliff): each point is predicted from the others
    only, weighted by exp(-(x_i - x_j)^2 / (2 bandwidth^2)), so a predictor that
    lines the points up on one curve scores near 1 and one that scatters them
    near 0 or below.
    """
    if len(x) < 4 or float(np.var(y)) == 0:
        return math.nan
    w = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * bandwidth ** 2))
    np.fill_diagonal(w, 0.0)
    total = w.sum(axis=1)
    pred = np.where(total > 0, (w @ y) / np.where(total > 0, total, 1.0), y.mean())
    return 1.0 - float(((y - pred) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())


PREDICTORS = {
    "lr": lambda r: r["lr"],
    "batch": lambda r: r["batch"],
    "lr / B": lambda r: r["lr"] / r["batch"],
    "S (k=1)": lambda r: r["S"],
    "S (k=2)": lambda r: r["S_k2"],
}


def collapse(rows: Sequence[dict[str, Any]], target: str = "gain_linear") -> dict[str, dict[str, float | None]]:
    """For each predictor, how well the mean `target` per configuration lines up on its log10.

    Seeds are averaged first (one point per (lr, B, m)), so the scores measure how
    well the configurations line up, not seed noise. spearman: rank correlation
    (how monotone the gain is in the predictor); smooth_r2: leave-one-out R^2
    of a kernel smoother (any curve shape); r2: R^2 of a quadratic, whose vertex
    is given as the predictor's value (10 ** log10 vertex) when it is concave.
    """
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["failed"]:
            configs.setdefault((r["lr"], r["batch"], r["momentum"]), []).append(r)
    points = [(group[0], float(np.mean([g[target] for g in group]))) for group in configs.values()]
    out: dict[str, dict[str, float | None]] = {}
    y = np.array([p[1] for p in points])
    for name, fn in PREDICTORS.items():
        x = np.log10(np.array([fn(p[0]) for p in points], dtype=float))
        r2, peak = quadratic_r2(x, y)
        out[name] = {"spearman": _spearman(x, y), "smooth_r2": smooth_r2(x, y), "r2": r2,
                     "peak": None if peak is None else 10 ** peak, "configs": len(points)}
    return out


def summary_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed means per (lr, B, m), sorted by S: the table of docs/results.md."""
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        configs.setdefault((r["lr"], r["batch"], r["momentum"]), []).append(r)
    table = []
    for (lr, batch, momentum), group in configs.items():
        ok = [g for g in group if not g["failed"]]
        entry = {"lr": lr, "batch": batch, "momentum": momentum, "S": group[0]["S"],
                 "runs": len(group), "failed": len(group) - len(ok)}
        for key in ("acc_a", "acc_linear", "gain_linear", "loss_gain_linear", "gain_ta", "ta_lambda",
                    "loss_barrier", "acc_barrier"):
            entry[key] = float(np.mean([g[key] for g in ok])) if ok else math.nan
        table.append(entry)
    return sorted(table, key=lambda e: e["S"])


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, k: float = 1.0) -> Path:
    """Accuracy gain (top) and loss gain (bottom) of the 0.5 merge against lr, B and S (log x), seed means."""
    from mergelab.analysis.plots import figure

    table = summary_table(rows)
    fig = figure((15, 8))
    axes = fig.subplots(2, 3)
    markers = {b: m for b, m in zip(sorted({e["batch"] for e in table}), "osD^v")}
    columns = [("lr", "learning rate"), ("batch", "batch size"), ("S", f"S = lr / (B (1-m)^{k:g})")]
    rows_ = [("gain_linear", "accuracy gain of the 0.5 merge"), ("loss_gain_linear", "loss gain of the 0.5 merge")]
    for (target, ylabel), line in zip(rows_, axes):
        for ax, (key, label) in zip(line, columns):
            for e in table:
                if math.isnan(e[target]):
                    continue
                color = "tab:blue" if e["momentum"] == 0 else "tab:red"
                ax.scatter(e[key], e[target], marker=markers[e["batch"]], color=color, alpha=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.axhline(0, color="grey", lw=0.5)
    axes = axes[0]
    handles = [axes[0].scatter([], [], color=c, label=f"momentum {m:g}") for m, c in ((0, "tab:blue"), (0.9, "tab:red"))]
    handles += [axes[0].scatter([], [], marker=mk, color="k", label=f"B = {b}") for b, mk in markers.items()]
    axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle("Two SGD branches from one digits checkpoint, merged at 0.5: gain by training configuration "
                 "(failed runs left out)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
