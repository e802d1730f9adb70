"""Relative error of torch's float32 norm / dot reductions on the CPU against float64, on real tensors.

    PYTHONPATH=src python bench/torch_norm_accuracy.py --models /tmp/tinyllama

Why nuslerp's and model_stock's references sum products ((a * b).sum()) instead of calling
torch.linalg.vector_norm / vecdot (docs/results-nuslerp-stock-speed.md, section 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open

NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight")


def tensor(folder: Path, name: str) -> torch.Tensor:
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():
                return h.get_tensor(name).float().reshape(-1)
    raise KeyError(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/tinyllama"))
    args = ap.parse_args()
    print("| tensor (entries) | vector_norm | sqrt(vecdot(x, x)) | vecdot(x, y) | sqrt((x*x).sum()) | (x*y).sum() |")
    print("|---|---|---|---|---|---|")
    for name in NAMES:
        x, y = tensor(args.models / "ft_a", name), tensor(args.models / "ft_b", name)
        norm, dot = x.double().norm().item(), (x.double() @ y.double()).item()
        cells = [(torch.linalg.vector_norm(x).item() - norm) / norm,
                 (torch.linalg.vecdot(x, x).sqrt().item() - norm) / norm,
                 (torch.linalg.vecdot(x, y).item() - dot) / dot,
                 ((x * x).sum().sqrt().item() - norm) / norm,
                 ((x * y).sum().item() - dot) / dot]
        print(f"| {name} ({x.numel()}) | " + " | ".join(f"{c:+.1e}" for c in cells) + " |")


if __name__ == "__main__":
    main()
