"""The MiniLM suite at four tasks: every registered method on subsets of 2, 3 and 4 fine-tunes, 3 seeds.

examples/minilm_regmean_fisher.py's two tasks (code_or_prose, module_family) on the real
all-MiniLM-L6-v2 encoder, plus two more labelings of the standard library's docstrings:

    docstring_owner  does a docstring sentence describe a class or a function?        (2 classes)
    tool_family      numbers (decimal, fractions, statistics, ...), data formats
                     (json, csv, pickle, email, ...) or developer tools (inspect,
                     typing, unittest, logging, ...)?                                  (3 classes)

Per seed: four fine-tunes (each with its own head), each model's sampled Fisher and
Gram matrices on its own training sentences, then every method of mergelab.demos.suite
on the ordered prefix of 2, 3 and 4 tasks (SUBSETS; --more-subsets adds a pair and a triple); a
merged encoder is scored on each task of its subset under that task's own head.
A reduced budget (fine-tuning runs on 2 shared CPU cores): see BUDGET.

    python examples/minilm_tasks4.py                  # 3 seeds (see docs/_parts/suite.md for the time)
    python examples/minilm_tasks4.py --fast           # 1 seed, a pair, a few steps: a pipeline check
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_regmean_fisher as two  # noqa: E402  (its data helpers, Classifier, fine-tuning, statistics)

import torch  # noqa: E402

from mergelab.demos import suite  # noqa: E402

OUT = Path(__file__).resolve().parent / "_out" / "minilm_tasks4"
TOOL_FAMILIES = {
    "numbers": ["decimal.py", "fractions.py", "statistics.py", "numbers.py", "random.py", "calendar.py",
                "datetime.py", "_pydecimal.py"],
    "data_formats": ["json/", "csv.py", "pickle.py", "configparser.py", "email/", "plistlib.py", "base64.py",
                     "mailbox.py", "xml/"],
    "developer_tools": ["inspect.py", "typing.py", "unittest/", "logging/", "argparse.py", "pydoc.py",
                        "dataclasses.py", "enum.py", "functools.py", "traceback.py", "pdb.py"],
}
OWNER_SOURCES = [f for items in (*two.FAMILIES.values(), *TOOL_FAMILIES.values()) for f in items]
BUDGET = dict(steps=60, batch=16, lr=5e-5, head_lr=2e-3, max_len=32, train_per_class=120, test_per_class=40,
              fisher_examples=64, gram_examples=128)
FAST = dict(steps=4, train_per_class=16, test_per_class=8, fisher_examples=8, gram_examples=16, max_len=24)
# subsets of (code_or_prose, module_family, docstring_owner, tool_family), by index: the ordered prefix
# of each size (the default run), then one more pair and triple (--more-subsets)
SUBSETS = [(0, 1), (0, 1, 2), (0, 1, 2, 3)]
MORE_SUBSETS = [(2, 3), (1, 2, 3)]
# no optimizer state or base-model Fisher is collected here; WUDI at 20 Adam steps (300 would take an
# hour per merge on these CPUs)
ONLY_NOT = {"optimizer_aware", "gradient_matching"}
OVERRIDES = {"wudi": {"iterations": 20}}


def owner_sentences(path: Path) -> dict[str, list[str]]:
    """Docstring sentences (as two.docstring_sentences cuts them) by what the docstring belongs to."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    out: dict[str, list[str]] = {"class": [], "function": []}
    for node in ast.walk(tree):
        kind = "class" if isinstance(node, ast.ClassDef) else (
            "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
        doc = ast.get_docstring(node, clean=True) if kind else None
        if doc:
            text = " ".join(ln.strip() for ln in doc.splitlines() if not ln.strip().startswith(">>>"))
            out[kind] += [s.strip() for s in two.re.split(r"(?<=[.!?])\s+", text) if 5 <= len(s.split()) <= 40]
    return out


def build_tasks4(cfg: argparse.Namespace) -> dict[str, dict]:
    """The two tasks of minilm_regmean_fisher plus docstring_owner and tool_family, seeded balanced splits."""
    tasks = two.build_tasks(cfg)
    owners: dict[str, list[str]] = {"class": [], "function": []}
    for f in two._files(OWNER_SOURCES):
        for kind, sents in owner_sentences(f).items():
            owners[kind] += sents
    n, m = cfg.train_per_class, cfg.test_per_class
    tasks["docstring_owner"] = {"classes": list(owners), **two._balanced(list(owners.values()), n, m, cfg.seed)}
    tools = [[s for f in two._files(items) for s in two.docstring_sentences(f)] for items in TOOL_FAMILIES.values()]
    tasks["tool_family"] = {"classes": list(TOOL_FAMILIES), **two._balanced(tools, n, m, cfg.seed)}
    return tasks


def build_seed(cfg: argparse.Namespace, tok, log) -> dict[str, Any]:
    """Four fine-tunes of one seed, their statistics, each one's own accuracy, and scoring probes."""
    from transformers import AutoModel

    t0 = time.perf_counter()
    tasks = build_tasks4(cfg)
    models = {name: two.fine_tune(cfg, tok, task, cfg.seed + k) for k, (name, task) in enumerate(tasks.items())}
    t_train = time.perf_counter() - t0
    log(f"seed {cfg.seed}: four fine-tunes of {cfg.steps} steps in {t_train:.0f} s")
    stats = [two.statistics(cfg, tok, models[n], tasks[n]) for n in tasks]
    t_stats = time.perf_counter() - t0 - t_train
    probes = {n: copy.deepcopy(m).eval() for n, m in models.items()}
    individual = {n: two.accuracy(m, tok, tasks[n], cfg.max_len) for n, m in models.items()}
    built = {"models": [m.encoder for m in models.values()], "base": AutoModel.from_pretrained(two.minilm_path()),
             "fisher": [s["fisher"] for s in stats], "gram": [s["gram"] for s in stats], "n_stats": cfg.fisher_examples,
             # RegMean++ takes its Grams on the Gram sentences again, through the merged earlier layers
             "plusplus_data": [two.batches(tok, tasks[n]["train"][:cfg.gram_examples], cfg.max_len, 32) for n in tasks]}
    return {"tasks": tasks, "built": built, "probes": probes, "individual": individual,
            "timing": {"train_s": t_train, "stats_s": t_stats}}


def run_seed(cfg: argparse.Namespace, tok, subsets: list, merges: list, log) -> tuple[list, dict]:
    seed_run = build_seed(cfg, tok, log)
    tasks = seed_run["tasks"]
    names = list(tasks)

    def score(state_dict: dict, subset) -> dict[str, float]:
        return two.score(state_dict, {t: seed_run["probes"][t] for t in subset}, tok, tasks, cfg.max_len)

    t0, records = time.perf_counter(), []
    for idx in subsets:
        subset = [names[i] for i in idx]
        records.append(suite.run_subset(subset, names, seed_run["built"], seed_run["individual"], score,
                                        cfg.seed, merges))
        log(f"seed {cfg.seed} {'+'.join(subset)}: merged and scored ({time.perf_counter() - t0:.0f} s so far)")
    timing = seed_run["timing"] | {"merge_and_score_s": time.perf_counter() - t0}
    sizes = {n: {"classes": t["classes"], "train": len(t["train"]), "test": len(t["test"])} for n, t in tasks.items()}
    return records, {"seed": cfg.seed, "individual": seed_run["individual"], "tasks": sizes, **timing}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="1 seed, one pair, a few steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="DIR",
                    help="no run: merge the minilm_tasks4.json of runs of other seeds (e.g. run side by side) into --out")
    ap.add_argument("--more-subsets", action="store_true", help="also (docstring_owner, tool_family) and a triple")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see minilm_regmean_fisher)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(two.minilm_path())
    budget = BUDGET | (FAST if args.fast else {})
    labels = [lb for lb, _, _ in suite.CANDIDATES if lb not in ONLY_NOT]
    merges = suite.registered_merges(OVERRIDES, only=labels)
    subsets = SUBSETS[:1] if args.fast else SUBSETS + (MORE_SUBSETS if args.more_subsets else [])
    start, records, seeds = time.perf_counter(), [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(args.first_seed, args.first_seed + (1 if args.fast else args.seeds)):
            recs, info = run_seed(argparse.Namespace(**budget, seed=seed), tok, subsets, merges, two.log)
            records += recs
            seeds.append(info)
            write(args.out, budget, merges, records, seeds, time.perf_counter() - start, args.fast)
    print((args.out / "minilm_tasks4.md").read_text())
    return json.loads((args.out / "minilm_tasks4.json").read_text())


def combine(dirs: list[Path], out: Path) -> dict[str, Any]:
    """One table of the seeds of several runs (the same budget and methods), as if run one after another."""
    runs = [json.loads((d / "minilm_tasks4.json").read_text()) for d in dirs]
    if len({json.dumps([r["budget"], r["methods"]]) for r in runs}) > 1:
        raise SystemExit("the runs differ in budget or methods; combine only runs of one configuration")
    merges = [(lb, m, p) for lb, (m, p) in runs[0]["methods"].items()]
    write(out, runs[0]["budget"], merges, [rec for r in runs for rec in r["records"]],
          [s for r in runs for s in r["seeds"]], sum(r["seconds"] for r in runs), runs[0]["fast"])
    print((out / "minilm_tasks4.md").read_text())
    return json.loads((out / "minilm_tasks4.json").read_text())


def write(out: Path, budget: dict, merges: list, records: list, seeds: list, seconds: float, fast: bool) -> None:
    """JSON, markdown table and plot of what has run so far (rewritten after every seed)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = suite.aggregate(records)
    title = f"MiniLM-L6, docstring tasks: normalised accuracy vs tasks merged ({len(seeds)} seed(s))"
    result = {"suite": "minilm", "budget": budget, "fast": fast, "subsets": [r["tasks"] for r in records],
              "methods": {lb: [m, p] for lb, m, p in merges}, "summary": summary, "errors": suite.errors(records),
              "seeds": seeds, "records": records, "seconds": seconds}
    (out / "minilm_tasks4.json").write_text(json.dumps(result, indent=1))
    table = suite.markdown_table(summary, title)
    if result["errors"]:
        table += "\nNot run: " + "; ".join(f"{k} ({v[:160]})" for k, v in result["errors"].items()) + "\n"
    (out / "minilm_tasks4.md").write_text(table + f"\n{seconds:.0f} s in all.\n")
    suite.plot_normalized(summary, out / "minilm_tasks4.png", title)


if __name__ == "__main__":
    main()
