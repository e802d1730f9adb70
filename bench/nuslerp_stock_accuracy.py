"""How close bf16 nuslerp / model_stock outputs are to the formula computed in float64, for mergelab
(float32 compute, one rounding to bf16) and mergekit-yaml (computes in the recipe's dtype, bf16).

    PYTHONPATH=src python bench/nuslerp_stock_accuracy.py --models /tmp/tinyllama [--tensors 9]

Merges whole models with both tools (bf16 output), then for the first --tensors tensors of layer 0
computes the formula in float64 (the previous, MergeKit-ordered formulas of
tests/methods/test_nuslerp_stock_kernels.py) and reports, per tool, the share of entries equal to
the float64 value rounded once to bf16 and the largest error in bf16 ulps of that value.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "methods"))
from test_nuslerp_stock_kernels import old_model_stock, old_nuslerp  # noqa: E402


def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: (f, k) for k in h.keys()})
    return out


def read(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(str(where[0]), "pt") as h:
        return h.get_tensor(where[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/tinyllama"))
    ap.add_argument("--tensors", type=int, default=9)
    args = ap.parse_args()
    base, a, b = (args.models / n for n in ("base", "ft_a", "ft_b"))
    pair = [{"model": str(a), "parameters": {"weight": 0.4}}, {"model": str(b), "parameters": {"weight": 0.6}}]
    recipes = {
        "nuslerp": ({"merge_method": "nuslerp", "models": pair},
                    lambda xs, z: old_nuslerp(xs, None, (0.4, 0.6))),
        "nuslerp_base": ({"merge_method": "nuslerp", "base_model": str(base), "models": pair},
                         lambda xs, z: old_nuslerp(xs, z, (0.4, 0.6))),
        "model_stock": ({"merge_method": "model_stock", "base_model": str(base),
                         "models": [{"model": str(a)}, {"model": str(b)}]},
                        lambda xs, z: old_model_stock(xs, z)),
    }
    work = Path(tempfile.mkdtemp(prefix="nuslerp_stock_accuracy_"))
    inputs = {n: tensors(p) for n, p in (("base", base), ("a", a), ("b", b))}
    names = [k for k in sorted(inputs["base"]) if ".layers.0." in k][: args.tensors]
    try:
        for name, (recipe, formula) in recipes.items():
            path = work / f"{name}.yml"
            path.write_text(yaml.safe_dump(dict(recipe, dtype="bfloat16")))
            outs = {}
            for tool in ("mergelab", "mergekit"):
                out = work / tool
                shutil.rmtree(out, ignore_errors=True)
                cmd = ([sys.executable, "-m", "mergelab.cli", "merge", str(path), str(out), "--quiet"]
                       if tool == "mergelab" else
                       [str(Path(sys.executable).with_name("mergekit-yaml")), str(path), str(out),
                        "--no-copy-tokenizer", "--quiet", "--out-shard-size", "5B"])
                subprocess.run(cmd, check=True, capture_output=True)
                outs[tool] = tensors(out)
            stats = {t: [0, 0, 0.0] for t in outs}  # equal, total, worst ulps
            for k in names:
                xs = [read(inputs[m][k]).double() for m in ("a", "b")]
                want = formula(xs, read(inputs["base"][k]).double())
                rounded = want.to(torch.bfloat16)
                ulp = torch.finfo(torch.bfloat16).eps * rounded.double().abs().clamp_min(1e-30)
                for tool, files in outs.items():
                    got = read(files[k])
                    stats[tool][0] += int((got == rounded).sum())
                    stats[tool][1] += got.numel()
                    stats[tool][2] = max(stats[tool][2], float(((got.double() - want).abs() / ulp).max()))
            for tool, (eq, tot, worst) in stats.items():
                print(f"{name:13s} {tool:8s} {len(names)} tensors {tot} entries: equal to float64 rounded once "
                      f"{100 * eq / tot:7.3f}%  worst {worst:6.2f} bf16 ulps", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
