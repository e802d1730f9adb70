"""Time each method through run_method (kernel and reference) on one TinyLlama MLP-sized tensor.

    PYTHONPATH=src python bench/kernels.py                 # kernels only
    PYTHONPATH=src python bench/kernels.py --reference     # and the readable references

One (5632, 2048) bfloat16 base and two fine-tunes (base + N(0, 1e-3)), weights
0.5, density 0.5 (breadcrumbs gamma 0.01, della epsilon 0.1), bf16 output; the
best of `--repeats` timings after one warm-up call (which compiles or loads the
kernel). A whole TinyLlama merge holds about 96 such tensors.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergelab.methods import NoParams, PerModel, get_method, run_method
from mergelab.methods.kernels import kernels_disabled

METHODS = ("linear", "slerp", "ties", "dare_linear", "dare_ties", "breadcrumbs_ties", "della", "sce")


def inputs(shape=(5632, 2048), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=g)).bfloat16()
    fts = [(base.float() + 1e-3 * torch.randn(shape, generator=g)).bfloat16() for _ in range(2)]
    return base, fts


def call(name, base, fts):
    spec = get_method(name)
    if name == "linear":
        xs, b, p, s = fts, None, PerModel([spec.model_params(weight=0.5)] * 2), spec.shared_params()
    elif name == "slerp":
        xs, b, p, s = fts[:1], base, PerModel([]), spec.shared_params(t=0.5)
    elif name == "sce":
        xs, b, p, s = fts, base, PerModel([NoParams()] * 2), spec.shared_params()
    else:
        extra = {"epsilon": 0.1} if name == "della" else {"gamma": 0.01} if name.startswith("breadcrumbs") else {}
        xs, b, p, s = fts, base, PerModel([spec.model_params(weight=0.5, density=0.5, **extra)] * 2), \
            spec.shared_params()
    return lambda: run_method(spec, xs, b, p, s, torch.Generator().manual_seed(1), out_dtype=torch.bfloat16)


def best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", action="store_true", help="also time the readable references")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base, fts = inputs()
    print(f"| method | kernel ms | {'reference ms | ' if args.reference else ''}")
    for name in METHODS:
        fn = call(name, base, fts)
        row = f"| {name} | {best(fn, args.repeats) * 1e3:.0f} |"
        if args.reference:
            with kernels_disabled():
                row += f" {best(fn, args.repeats) * 1e3:.0f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
