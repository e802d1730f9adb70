"""Does merging in each optimizer's own geometry beat plain averaging?

Several copies of one MLP are trained on the same digits (scikit-learn's bundled
8x8 digits), from the same initialisation and with the same batches, by
different optimizers: plain SGD, Adam with the default betas (0.9, 0.999), and
Adam with short memories (0.5, 0.9). Each pair (and all three) is merged three
ways, each the minimiser of J(theta) = sum_k (theta - theta_k)^T G_k (theta - theta_k)
for its own choice of metric G_k:

    linear           G_k = I                                  (plain average)
    optimizer_aware  G_k = the optimizer's preconditioner,    (Adam: (sqrt(v_hat) + eps) / lr,
                     divided by its learning rate             SGD: 1 / lr)
    fisher           G_k = diagonal Fisher on the training data

Each merge is scored by its training and test loss and accuracy, and by J under
each metric (G = I, optimizer, Fisher), relative to the linear merge's J. All of
it is repeated over five seeds (split, initialisation, batch order); the tables
show means. Results: a rich table per scenario, and ``results.json`` and
``optimizer_geometry.png`` in the output folder.

    python examples/optimizer_geometry.py            # full configuration (well under a minute, 2 cores)
    python examples/optimizer_geometry.py --fast     # a few seconds; what the tests run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import mergelab
from mergelab.demos.digits import accuracy, load_digits_split, make_mlp, single_thread, train
from mergelab.methods.preconditioned import weighted_objective
from mergelab.stats import diagonal_fisher, extract_optimizer_metrics

# name -> optimizer factory; every one runs for the same steps on the same batches.
OPTIMIZERS = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.sgd_lr),
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.adam_lr, betas=(0.9, 0.999)),
    "adam_short": lambda params, cfg: torch.optim.Adam(params, lr=cfg.adam_lr, betas=(0.5, 0.9)),
}
SCENARIOS = {
    "adam_vs_sgd": ["adam", "sgd"],
    "adam_betas": ["adam", "adam_short"],
    "all_three": ["sgd", "adam", "adam_short"],
}
MERGES = {"linear": "identity", "optimizer_aware": "optimizer", "fisher": "fisher"}  # merge -> metric it minimises


def config(fast: bool, seed: int) -> argparse.Namespace:
    cfg = argparse.Namespace(hidden=128, steps=600, batch=64, adam_lr=1e-3, sgd_lr=0.1, fisher_examples=512,
                             seed=seed, replicates=5, fast=fast)
    if fast:
        cfg.__dict__.update(hidden=32, steps=150, fisher_examples=128, replicates=1)
    return cfg


def objective(theta: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]],
              metrics: list[dict[str, torch.Tensor]] | None) -> float:
    """J(theta) = sum_k sum_tensors (theta - theta_k)^T G_k (theta - theta_k); G_k = I when metrics is None."""
    total = 0.0
    for name, t in theta.items():
        x = torch.stack([m[name] for m in models]).double()  # (K, *shape)
        g = torch.ones_like(x) if metrics is None else torch.stack([m[name] for m in metrics]).double()
        total += float(weighted_objective(t.double(), x, g))
    return total


@torch.no_grad()
def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(nn.functional.cross_entropy(model(x), y))


def train_models(cfg: argparse.Namespace, data: dict[str, torch.Tensor], seed: int) -> dict[str, dict]:
    """One model per optimizer from one initialisation, with its optimizer metric and Fisher."""
    torch.manual_seed(seed)
    init = make_mlp(cfg.hidden).state_dict()
    n = min(cfg.fisher_examples, len(data["y_train"]))
    fisher_batches = [(data["x_train"][i:min(i + 64, n)], data["y_train"][i:min(i + 64, n)])
                      for i in range(0, n, 64)]
    out = {}
    for name, make in OPTIMIZERS.items():
        model = make_mlp(cfg.hidden)
        model.load_state_dict(init)
        opt = make(model.parameters(), cfg)
        train(model, opt, data["x_train"], data["y_train"], cfg.steps, cfg.batch, seed)  # same batches
        out[name] = {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            # Divided by the learning rate, SGD's and Adam's metrics share one unit: inverse step size.
            "optimizer": extract_optimizer_metrics(model, opt.state_dict(), divide_by_lr=True),
            "fisher": diagonal_fisher(model, fisher_batches, kind="exact"),
        }
    return out


def score(cfg, state: dict[str, torch.Tensor], data: dict[str, torch.Tensor]) -> dict[str, float]:
    model = make_mlp(cfg.hidden)
    model.load_state_dict(state)
    return {"train_loss": loss_of(model, data["x_train"], data["y_train"]),
            "test_loss": loss_of(model, data["x_test"], data["y_test"]),
            "test_accuracy": accuracy(model, data["x_test"], data["y_test"])}


def run_scenario(cfg, trained: dict[str, dict], names: list[str], data) -> dict:
    states = [trained[n]["state"] for n in names]
    metrics = {"identity": None, "optimizer": [trained[n]["optimizer"] for n in names],
               "fisher": [trained[n]["fisher"] for n in names]}
    rows = {n: score(cfg, trained[n]["state"], data) for n in names}
    for merge, own_metric in MERGES.items():
        stats = metrics[own_metric]
        kw = {"weight": 1.0} | ({"stats": stats} if stats is not None else {})
        merged = mergelab.merge_state_dicts(merge, states, **kw)
        rows[merge] = score(cfg, merged, data) | {
            f"J_{m}": objective(merged, states, metrics[m]) for m in ("identity", "optimizer", "fisher")}
    return {"models": names, "rows": rows}


def run_once(cfg: argparse.Namespace, seed: int) -> dict:
    """One replicate: split, initialisation and batch order drawn from ``seed``."""
    data = load_digits_split(seed)
    trained = train_models(cfg, data, seed)
    return {name: run_scenario(cfg, trained, names, data) for name, names in SCENARIOS.items()}


def summarize(runs: list[dict]) -> dict:
    """Each scenario's rows averaged over replicates, with the std of the test loss."""
    out = {}
    for name, first in runs[0].items():
        rows = {}
        for label, row in first["rows"].items():
            per_run = [run[name]["rows"][label] for run in runs]
            rows[label] = {k: sum(r[k] for r in per_run) / len(runs) for k in row}
            losses = [r["test_loss"] for r in per_run]
            mean = rows[label]["test_loss"]
            rows[label]["test_loss_std"] = (sum((v - mean) ** 2 for v in losses) / max(len(runs) - 1, 1)) ** 0.5
            # J relative to the linear merge, averaged per replicate (J's scale differs between seeds).
            for key in [k for k in row if k.startswith("J_")]:
                rows[label][key + "_vs_linear"] = sum(
                    r[key] / run[name]["rows"]["linear"][key] for r, run in zip(per_run, runs)) / len(runs)
        out[name] = {"models": first["models"], "rows": rows}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="a small network and short training (a few seconds)")
    p.add_argument("--out", type=Path, default=Path("examples/_out/optimizer_geometry"))
    p.add_argument("--seed", type=int, default=0, help="seed of the first replicate; the others take the next ones")
    args = p.parse_args(argv)
    cfg = config(args.fast, args.seed)
    start = time.perf_counter()
    with single_thread(), warnings_recorded() as caught:
        runs = [run_once(cfg, args.seed + r) for r in range(cfg.replicates)]
    result = {"config": vars(cfg), "scenarios": summarize(runs), "runs": runs,
              "warnings": sorted({str(w.message) for w in caught}), "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "optimizer_geometry.png")
    print_tables(result)
    return result


@contextlib.contextmanager
def warnings_recorded():
    """Collect warnings (e.g. Fisher entries raised to the floor) into the results instead of the console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console = console if console.is_terminal else Console(width=120)
    n = result["config"]["replicates"]
    for name, sc in result["scenarios"].items():
        table = Table(title=f"{name}: {' + '.join(sc['models'])}, mean of {n} seed{'s' * (n > 1)} "
                            "(J relative to the linear merge's)")
        for col in ("model", "train loss", "test loss", "test acc", "J identity", "J optimizer", "J fisher"):
            table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
        for label, r in sc["rows"].items():
            js = [f"{r[k + '_vs_linear']:.3f}" if k in r else "" for k in ("J_identity", "J_optimizer", "J_fisher")]
            std = f" ±{r['test_loss_std']:.4f}" if n > 1 else ""
            table.add_row(label, f"{r['train_loss']:.4f}", f"{r['test_loss']:.4f}{std}", f"{r['test_accuracy']:.3f}",
                          *js, end_section=label == sc["models"][-1])
        console.print(table)


def plot(result: dict, path: Path) -> Path:
    """Left: test loss of each merge per scenario. Right: J under each metric, relative to linear's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_loss, ax_j = fig.subplots(1, 2)
    names = list(result["scenarios"])
    width = 0.8 / len(MERGES)
    for j, merge in enumerate(MERGES):
        xs = [i + (j - (len(MERGES) - 1) / 2) * width for i in range(len(names))]
        rows = [result["scenarios"][n]["rows"][merge] for n in names]
        ax_loss.bar(xs, [r["test_loss"] for r in rows], width, yerr=[r["test_loss_std"] for r in rows], label=merge)
    best = [min(result["scenarios"][n]["rows"][m]["test_loss"] for m in result["scenarios"][n]["models"])
            for n in names]
    ax_loss.scatter(range(len(names)), best, marker="_", s=500, color="black", zorder=3, label="best single model")
    ax_loss.set_xticks(range(len(names)), names)
    ax_loss.set_ylabel("test cross-entropy")
    ax_loss.legend(fontsize=8)
    labels = [f"{n}\n{m}" for n in names for m in ("optimizer", "fisher")]
    for j, merge in enumerate(MERGES):
        vals = [result["scenarios"][n]["rows"][merge][f"J_{m}_vs_linear"]
                for n in names for m in ("optimizer", "fisher")]
        ax_j.bar([i + (j - 1) * width for i in range(len(labels))], vals, width, label=merge)
    ax_j.set_xticks(range(len(labels)), labels, fontsize=7)
    ax_j.set_yscale("log")
    ax_j.set_ylabel("J / J(linear merge)")
    ax_j.legend(fontsize=8)
    fig.suptitle("merging models trained by different optimizers (digits MLP)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
