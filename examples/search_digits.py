"""Search per-task coefficients of TIES and task arithmetic on the digits four-task demo.

The demo's four fine-tunes (src/mergelab/demos/digits.py) are trained on 80% of
its training split; the other 20% is a validation split on which `mergelab
search` (CMA-ES over per-task weights, TIES densities and lambda, every
candidate merged in memory) picks a recipe. Searched and hand-set recipes (the
demo's: task arithmetic lambda 0.4; TIES density 0.2, lambda 1) are then scored
on the untouched test split. Repeated over seeds; writes JSON, a PNG and a table.

    python examples/search_digits.py --seeds 0 1 2 --budget 150 --out docs/img/search
    python examples/search_digits.py --fast      # one seed, small budget (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelab.demos import digits as dd
from mergelab.search.candidate import CandidateEvaluator
from mergelab.search.optimize import SearchSettings, run_search
from mergelab.search.pareto import Objective
from mergelab.search.space import find_search_params

R = lambda lo, hi: {"search": [lo, hi]}  # noqa: E731


def spaces(base: str, models: list[str]) -> dict[str, dict]:
    """The searched recipes: ranges written in the recipe, as a user would."""
    return {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base,
                            "models": [{"model": m, "parameters": {"weight": R(0.0, 1.5)}} for m in models]},
        "ties": {"merge_method": "ties", "base_model": base, "parameters": {"lambda": R(0.5, 3.0)},
                 "models": [{"model": m, "parameters": {"weight": R(0.1, 1.0), "density": R(0.05, 1.0)}}
                            for m in models]},
    }


def hand_set(base: str, models: list[str]) -> dict[str, dict]:
    """The demo's recipes (MERGES), unchanged."""
    return {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 0.4},
                            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]},
        "ties": {"merge_method": "ties", "base_model": base, "parameters": {"lambda": 1.0},
                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.2}} for m in models]},
    }


def task_evaluator(x: torch.Tensor, y: torch.Tensor, seed: int):
    inputs = {t: dd.task_inputs(t, x, seed) for t in dd.TASKS}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        acc = {t: dd.accuracy(model, inputs[t], y) for t in dd.TASKS}
        return {**acc, "mean_accuracy": sum(acc.values()) / len(acc)}

    return evaluate


def run_seed(cfg: dd.DemoConfig, seed: int, budget: int, root: Path) -> dict:
    data = dd.load_digits_split(seed)
    n_fit = int(0.8 * len(data["y_train"]))
    val = {"x": data["x_train"][n_fit:], "y": data["y_train"][n_fit:]}
    data = {**data, "x_train": data["x_train"][:n_fit], "y_train": data["y_train"][:n_fit]}
    built = dd.build_models(cfg, data, seed)
    folder = root / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, m in [("base", built["base"]), *zip(dd.TASKS, built["models"])]:
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / f"{name}.safetensors"))
        paths.append(str(folder / f"{name}.safetensors"))
    base, models = paths[0], paths[1:]
    on_val = CandidateEvaluator(task_evaluator(val["x"], val["y"], seed), [dd.make_mlp(cfg.hidden)])
    on_test = CandidateEvaluator(task_evaluator(data["x_test"], data["y_test"], seed), [dd.make_mlp(cfg.hidden)])
    out = {"seed": seed, "individual_test": {t: dd.accuracy(m, dd.task_inputs(t, data["x_test"], seed),
                                                            data["y_test"]) for t, m in zip(dd.TASKS, built["models"])}}
    hand = hand_set(base, models)
    for method, recipe in spaces(base, models).items():
        params = find_search_params(recipe)
        # Scored first: it also compiles the method's kernels, a one-off cost the search should not carry.
        hand_val, hand_test = on_val(hand[method])["mean_accuracy"], on_test(hand[method])
        t0 = time.perf_counter()
        result = run_search(recipe, params, on_val, [Objective("mean_accuracy", True)],
                            SearchSettings(budget=budget, storage=None, sampler="cmaes", seed=seed))
        seconds = time.perf_counter() - t0
        best = result.recipe_of(result.best[0], recipe, params)
        trial = next(t for t in result.trials if t["number"] == result.best[0])
        out[method] = {
            "hand_set": {"val": hand_val, "test": hand_test},
            "searched": {"val": trial["metrics"]["mean_accuracy"], "test": on_test(best), "params": trial["params"]},
            "search_seconds": seconds, "candidates": len(result.trials),
            "curve": [t["metrics"]["mean_accuracy"] if t["metrics"] else None for t in result.trials],
        }
        print(f"seed {seed} {method}: hand-set test {out[method]['hand_set']['test']['mean_accuracy']:.4f}, "
              f"searched test {out[method]['searched']['test']['mean_accuracy']:.4f} "
              f"({len(result.trials)} candidates, {seconds:.1f} s)", flush=True)
    on_val.close()
    on_test.close()
    return out


def plot(runs: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels, hand, found = [], [], []
    for r in runs:
        for m in ("task_arithmetic", "ties"):
            labels.append(f"{m}\nseed {r['seed']}")
            hand.append(r[m]["hand_set"]["test"]["mean_accuracy"])
            found.append(r[m]["searched"]["test"]["mean_accuracy"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], hand, 0.4, label="hand-set (demo)")
    ax.bar([i + 0.2 for i in x], found, 0.4, label="searched on validation")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("mean test accuracy, 4 tasks")
    ax.set_ylim(min(hand + found) - 0.05, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("digits: hand-set vs searched recipes (test)")
    for k, m in enumerate(("task_arithmetic", "ties")):
        for r in runs:
            curve = [v for v in r[m]["curve"] if v is not None]
            best = [max(curve[:i + 1]) for i in range(len(curve))]
            ax2.plot(best, color=f"C{k}", alpha=0.8, label=m if r is runs[0] else None)
            ax2.axhline(r[m]["hand_set"]["val"], color=f"C{k}", ls=":", lw=0.8)
    ax2.set_xlabel("candidate")
    ax2.set_ylabel("best validation accuracy so far")
    ax2.set_title("CMA-ES (dotted: hand-set on validation)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=150)
    p.add_argument("--fast", action="store_true", help="one seed, the demo's fast models, budget 20")
    p.add_argument("--out", type=Path, default=Path("examples/_out/search"))
    args = p.parse_args(argv)
    cfg = dd.DemoConfig(**(dd.FAST if args.fast else {}))
    seeds, budget = ([args.seeds[0]], min(args.budget, 20)) if args.fast else (args.seeds, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, dd.single_thread():
        runs = [run_seed(cfg, s, budget, Path(tmp)) for s in seeds]
    summary = {}
    for m in ("task_arithmetic", "ties"):
        hand = [r[m]["hand_set"]["test"]["mean_accuracy"] for r in runs]
        found = [r[m]["searched"]["test"]["mean_accuracy"] for r in runs]
        summary[m] = {"hand_set_test": statistics.mean(hand), "searched_test": statistics.mean(found),
                      "gain": statistics.mean(f - h for f, h in zip(found, hand)),
                      "search_seconds": statistics.mean(r[m]["search_seconds"] for r in runs),
                      "candidates": runs[0][m]["candidates"]}
    result = {"budget": budget, "seeds": seeds, "fast": args.fast, "summary": summary, "runs": runs}
    (args.out / "digits_search.json").write_text(json.dumps(result, indent=2))
    plot(runs, args.out / "digits_search.png")
    for m, s in summary.items():
        print(f"{m}: hand-set {s['hand_set_test']:.4f}, searched {s['searched_test']:.4f} "
              f"(gain {s['gain']:+.4f}), {s['candidates']} candidates in {s['search_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
