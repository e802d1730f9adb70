"""The built-in demo: merge four fine-tuned digit classifiers with every method in mergelab.

Data is scikit-learn's bundled 8x8 digits (nothing is downloaded). A small MLP
(64-128-128-10) is pretrained on the plain digits; four copies are fine-tuned
from it on four tasks, each the same digits under one fixed input transform
(rotated 90 degrees, mirrored, shifted, pixels shuffled), two with Adam and two
with plain SGD. The four are then merged with every family of mergelab -- data-free
(average, task arithmetic, TIES, DARE-TIES, TSV, Iso-C, Iso-CTS, optimizer-aware)
and data-aware (Fisher, RegMean, gradient matching) -- with the statistics each
needs computed by mergelab.stats on the tasks' training data. The merged model
is scored on every task's test split. The whole experiment is repeated over five
seeds (split, initialisation, batch order) and the table shows means.

No hyperparameter is tuned: every method runs at its paper's default, given in
MERGES. Results: a rich table, ``digits_demo.json`` and ``digits_demo.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mergelab
from mergelab.stats import diagonal_fisher, extract_optimizer_metrics, gram_matrices


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    hidden: int = 128
    pretrain_steps: int = 600
    finetune_steps: int = 400
    batch: int = 64
    adam_lr: float = 1e-3
    sgd_lr: float = 0.1
    stats_examples: int = 512  # training examples per model for Fisher and Gram statistics
    replicates: int = 5  # independent seeds; the table shows their mean


FAST = {"hidden": 64, "pretrain_steps": 250, "finetune_steps": 150, "stats_examples": 128, "replicates": 1}


def _rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    return x.view(-1, 8, 8).rot90(1, (1, 2)).reshape(-1, 64)


def _mirror(x: torch.Tensor, seed: int) -> torch.Tensor:
    return x.view(-1, 8, 8).flip(2).reshape(-1, 64)


def _shift(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Move the digit two pixels down and two right, filling with background."""
    out = torch.zeros(x.shape[0], 8, 8, dtype=x.dtype)
    out[:, 2:, 2:] = x.view(-1, 8, 8)[:, :6, :6]
    return out.reshape(-1, 64)


def _shuffle(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed permutation of the 64 pixels, drawn from the seed."""
    return x[:, torch.randperm(64, generator=torch.Generator().manual_seed(seed + 1))]


# Each task: a fixed transform (n, 64) -> (n, 64) of the pixels, and the optimizer its model is fine-tuned with.
TASKS: dict[str, tuple[Callable[[torch.Tensor, int], torch.Tensor], str]] = {
    "rotate": (_rotate, "adam"),
    "mirror": (_mirror, "sgd"),
    "shift": (_shift, "adam"),
    "shuffle": (_shuffle, "sgd"),
}

# (label, method, parameters) at the defaults of each method's paper (no tuning on any split):
#   task arithmetic lambda 0.4 and TIES density 0.2 with lambda 1: the values Yadav et al.
#   (arXiv:2306.01708) recommend when no validation set is available;
#   DARE density 0.5: the middle of the drop rates the DARE paper sweeps (no single default),
#   with TIES' sign election and disjoint mean; TSV alpha 1 (the paper's); Iso-C / Iso-CTS
#   alpha 1 and common fraction 0.8 (the paper's f; alpha is FusionBench's default);
#   RegMean alpha 0.1 (the authors' released configurations); Fisher floor 1e-6 (exact Fisher);
#   optimizer_aware on metrics divided by each model's learning rate; gradient_matching with
#   a_t = 1, H = n x Fisher and the base's Fisher on its pretraining data as H_0 (merge_kwargs).
MERGES: list[tuple[str, str, dict[str, Any]]] = [
    ("average", "linear", {"weight": 1.0}),
    ("task_arithmetic", "task_arithmetic", {"weight": 1.0, "lambda": 0.4}),
    ("ties", "ties", {"weight": 1.0, "density": 0.2, "lambda": 1.0}),
    ("dare_ties", "dare_ties", {"weight": 1.0, "density": 0.5, "normalize": True}),
    ("tsv", "tsv", {"alpha": 1.0}),
    ("iso_c", "iso_c", {"alpha": 1.0}),
    ("iso_cts", "iso_cts", {"alpha": 1.0, "common_space_fraction": 0.8}),
    ("fisher", "fisher", {}),
    ("regmean", "regmean", {"alpha": 0.1}),
    ("optimizer_aware", "optimizer_aware", {}),
    ("gradient_matching", "gradient_matching", {}),
]


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block, restoring the previous count after.

    For a network this small a second thread only adds synchronisation, and on a busy
    machine the threads' spin-waits made training ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_digits_split(seed: int) -> dict[str, torch.Tensor]:
    """Digits as float pixels in [0, 1]; a seeded 70/30 train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return {"x_train": x[perm[:cut]], "y_train": y[perm[:cut]], "x_test": x[perm[cut:]], "y_test": y[perm[cut:]]}


def task_inputs(name: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    return TASKS[name][0](x, seed)


def make_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          steps: int, batch: int, seed: int) -> None:
    """Minibatch cross-entropy training; the batch order comes from ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _batches(x: torch.Tensor, y: torch.Tensor, n: int, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:min(i + size, n)], y[i:min(i + size, n)]) for i in range(0, min(n, len(y)), size)]


def build_models(cfg: DemoConfig, data: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    """Pretrain the base, fine-tune one model per task, and compute every statistic the merges need."""
    torch.manual_seed(seed)
    base = make_mlp(cfg.hidden)
    train(base, torch.optim.Adam(base.parameters(), lr=cfg.adam_lr), data["x_train"], data["y_train"],
          cfg.pretrain_steps, cfg.batch, seed)
    n_stats = min(cfg.stats_examples, len(data["y_train"]))
    t0 = time.perf_counter()
    base_fisher = diagonal_fisher(base, _batches(data["x_train"], data["y_train"], n_stats), kind="exact")
    stats_s = time.perf_counter() - t0
    models, fishers, grams, opt_metrics, datas = [], [], [], [], []
    for k, (name, (_, kind)) in enumerate(TASKS.items()):
        x = task_inputs(name, data["x_train"], seed)
        model = make_mlp(cfg.hidden)
        model.load_state_dict(base.state_dict())
        opt = (torch.optim.Adam(model.parameters(), lr=cfg.adam_lr) if kind == "adam"
               else torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr))
        train(model, opt, x, data["y_train"], cfg.finetune_steps, cfg.batch, seed + 10 + k)
        t0 = time.perf_counter()
        batches = _batches(x, data["y_train"], n_stats)
        fishers.append(diagonal_fisher(model, batches, kind="exact"))
        grams.append(gram_matrices(model, batches))
        datas.append(batches)  # RegMean++ takes its Grams on these again, through the merged earlier layers
        # Dividing by the learning rate puts Adam's and SGD's metrics in one unit (inverse step size).
        opt_metrics.append(extract_optimizer_metrics(model, opt.state_dict(), divide_by_lr=True))
        stats_s += time.perf_counter() - t0
        models.append(model)
    return {"base": base, "models": models, "fisher": fishers, "gram": grams, "optimizer": opt_metrics,
            "base_fisher": base_fisher, "n_stats": n_stats, "stats_seconds": stats_s, "plusplus_data": datas}


def merge_kwargs(method: str, params: dict[str, Any], built: dict[str, Any], seed: int) -> dict[str, Any]:
    """The merge_state_dicts arguments of one merge: base, statistics, seed, parameters."""
    sds = [m.state_dict() for m in built["models"]]
    kw: dict[str, Any] = {"models": sds, **params}
    if mergelab.methods()[method]["base"] == "required":
        kw["base"] = built["base"].state_dict()
    if method == "dare_ties":
        kw["seed"] = seed
    elif method in ("fisher", "regmean", "optimizer_aware"):
        kw["stats"] = built[{"fisher": "fisher", "regmean": "gram", "optimizer_aware": "optimizer"}[method]]
    elif method == "gradient_matching":
        # Daheim et al. scale the squared-gradient Fisher by the number of examples: H = n F;
        # the base's Fisher on the pretraining data is the prior H_0, and a_t = 1.
        n = built["n_stats"]
        kw.update(stats=built["fisher"], base_stats=built["base_fisher"], stats_scale=float(n),
                  prior_weight=float(n), weight=1.0)
    return kw


def evaluate(model: nn.Module, data: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    return {name: accuracy(model, task_inputs(name, data["x_test"], seed), data["y_test"]) for name in TASKS}


def run_merges(cfg: DemoConfig, built: dict[str, Any], data: dict[str, torch.Tensor],
               individual: dict[str, float], seed: int) -> dict[str, Any]:
    """Every merge of MERGES: accuracy per task, average, normalised accuracy, seconds, warnings."""
    out = {}
    for label, method, params in MERGES:
        kw = merge_kwargs(method, params, built, seed)
        models = kw.pop("models")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mergelab.merge_state_dicts(method, models, **kw)
        # Timed on a second, identical run: torch.linalg's one-off start-up would otherwise be
        # charged to whichever method happens to run first.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            merged_sd = mergelab.merge_state_dicts(method, models, **kw)
            seconds = time.perf_counter() - t0
        model = make_mlp(cfg.hidden)
        model.load_state_dict(merged_sd)
        acc = evaluate(model, data, seed)
        out[label] = {
            "method": method, "params": params, "accuracy": acc,
            "average": sum(acc.values()) / len(acc),
            "normalized": sum(acc[t] / individual[t] for t in TASKS) / len(TASKS),
            "seconds": seconds,
            "warnings": sorted({str(w.message) for w in caught}),
        }
    return out


def run_once(cfg: DemoConfig, seed: int) -> dict[str, Any]:
    """One replicate: split, pretraining, fine-tuning, statistics and merges all drawn from ``seed``."""
    data = load_digits_split(seed)
    built = build_models(cfg, data, seed)
    own = {name: evaluate(m, data, seed) for name, m in zip(TASKS, built["models"])}
    individual = {name: own[name][name] for name in TASKS}
    return {"seed": seed, "pretrained": evaluate(built["base"], data, seed), "individual": individual,
            "fine_tuned_on_all_tasks": own, "stats_seconds": built["stats_seconds"],
            "merges": run_merges(cfg, built, data, individual, seed)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    m = _mean(values)
    return (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over replicates; the std over replicates of each merge's average and normalised accuracy."""
    def mean_acc(rows: list[dict[str, float]]) -> dict[str, float]:
        return {t: _mean([r[t] for r in rows]) for t in TASKS}

    merges = {}
    for label, method, params in MERGES:
        rs = [run["merges"][label] for run in runs]
        merges[label] = {
            "method": method, "params": params, "accuracy": mean_acc([r["accuracy"] for r in rs]),
            "average": _mean([r["average"] for r in rs]), "average_std": _std([r["average"] for r in rs]),
            "normalized": _mean([r["normalized"] for r in rs]),
            "normalized_std": _std([r["normalized"] for r in rs]),
            "seconds": _mean([r["seconds"] for r in rs]),
            "warnings": sorted({w for r in rs for w in r["warnings"]}),
        }
    return {"pretrained": mean_acc([r["pretrained"] for r in runs]),
            "individual": mean_acc([r["individual"] for r in runs]), "merges": merges}


def run_digits_demo(out_dir: Path, *, fast: bool = False, seed: int = 0, show: bool = True,
                    replicates: int | None = None) -> dict:
    """Run the demo, print its table, and write ``digits_demo.json`` and ``digits_demo.png`` to out_dir.

    Args:
        out_dir: folder for the JSON and PNG (created if missing).
        fast: one replicate of a smaller network trained for fewer steps (what the tests run).
        seed: the first replicate's seed (the others take the next ones); it draws the
            split, the initialisation, the batch order and DARE's masks.
        show: print the rich table.
        replicates: seeds to run (default: the configuration's, 5, or 1 with `fast`).

    Returns:
        The results as written to the JSON: config, tasks, each replicate's accuracies
        (``runs``) and their means over replicates (``pretrained``, ``individual``, ``merges``).
    """
    start = time.perf_counter()
    cfg = DemoConfig(**{**(FAST if fast else {}), **({"replicates": replicates} if replicates else {})})
    from rich.progress import Progress

    runs = []
    with single_thread(), Progress(transient=True, disable=not show) as progress:
        task = progress.add_task("training four task models and merging them with every method, seed by seed",
                                 total=cfg.replicates)
        for r in range(cfg.replicates):
            runs.append(run_once(cfg, seed + r))
            progress.advance(task)
    result = {
        "config": dataclasses.asdict(cfg) | {"fast": fast, "seeds": [run["seed"] for run in runs]},
        "tasks": {name: {"optimizer": kind} for name, (_, kind) in TASKS.items()},
        **summarize(runs),
        "runs": runs,
    }
    result["seconds"] = time.perf_counter() - start
    from mergelab.checkpoint.output import atomic_file, write_file_atomic

    out_dir = Path(out_dir)
    # The demo's own files: replaced on a rerun, each written whole or not at all.
    write_file_atomic(out_dir / "digits_demo.json", json.dumps(result, indent=2), overwrite=True, what="demo JSON")
    with atomic_file(out_dir / "digits_demo.png", overwrite=True, what="demo plot") as temp:
        plot_results(result, temp)
    if show:
        print_table(result)
        from rich.console import Console

        Console().print(f"wrote {out_dir / 'digits_demo.json'} and {out_dir / 'digits_demo.png'}")
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    tasks = list(result["tasks"])
    n = len(result["runs"])
    table = Table(title=f"digits: four fine-tunes merged, test accuracy, mean of {n} seed{'s' * (n > 1)} "
                        f"({result['seconds']:.0f} s in all)")
    for col in ("model", *tasks, "avg", "norm.", "merge ms"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    pre, ind = result["pretrained"], result["individual"]
    table.add_row("pretrained base", *[f"{pre[t]:.3f}" for t in tasks], f"{_mean(list(pre.values())):.3f}", "", "")
    table.add_row("individual fine-tuned", *[f"{ind[t]:.3f}" for t in tasks], f"{_mean(list(ind.values())):.3f}",
                  "1.000", "", end_section=True)
    for label, r in result["merges"].items():
        pm = (lambda key: f" ±{r[key + '_std']:.3f}") if n > 1 else (lambda key: "")
        table.add_row(label, *[f"{r['accuracy'][t]:.3f}" for t in tasks], f"{r['average']:.3f}{pm('average')}",
                      f"{r['normalized']:.3f}{pm('normalized')}", f"{1000 * r['seconds']:.1f}")
    console = Console()
    # Printed to a file or pipe, rich assumes 80 columns and would truncate the numbers.
    (console if console.is_terminal else Console(width=120)).print(table)


def plot_results(result: dict, path: Path) -> Path:
    """Grouped bars: each merge's accuracy on every task; its normalised accuracy as a black tick (± std)."""
    from mergelab.analysis.plots import figure

    tasks = list(result["tasks"])
    rows = {"individual": result["individual"], **{k: r["accuracy"] for k, r in result["merges"].items()}}
    fig = figure((11, 4.5))  # an Agg canvas of its own: no pyplot, no display, no global state
    ax = fig.add_subplot()
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        ax.bar([i + (j - (len(tasks) - 1) / 2) * width for i in range(len(rows))],
               [acc[t] for acc in rows.values()], width, label=f"{t} ({result['tasks'][t]['optimizer']})")
    norm = [1.0] + [r["normalized"] for r in result["merges"].values()]
    err = [0.0] + [r["normalized_std"] for r in result["merges"].values()]
    ax.errorbar(range(len(rows)), norm, yerr=err, fmt="_", markersize=20, color="black", zorder=3,
                label="normalised accuracy")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":")  # chance level of 10 classes
    ax.set_xticks(range(len(rows)), list(rows), rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"digits: merging four fine-tunes (Adam and SGD), mean of {len(result['runs'])} seeds")
    ax.legend(fontsize=8, ncol=5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
