"""Every tensor of the TinyLlama-shaped set, against the exact (float64) value of each formula:
karcher of two models = normalise(u_a + u_b) (|a| + |b|) / 2 (the geodesic midpoint is the Karcher mean
of two points); multislerp = normalise(sum_i w_i u_i) sum_i w_i |v_i| (+ base) (its tangent step is 0).

mergelab (this checkout), mergelab's previous formulas (kept in tests/methods/test_spherical_gram.py)
and MergeKit 0.1.5 (float32) on /tmp/tinyllama/{base,ft_a,ft_b}. Usage: PYTHONPATH=src python bench/spherical_exact.py
"""
import sys
from pathlib import Path

import torch
from safetensors import safe_open
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "methods")]
from method_helpers import merge, mergekit, weights
from test_spherical_gram import old_karcher, old_multislerp
def tensors(m):
    out = {}
    for f in sorted(Path(f"/tmp/tinyllama/{m}").glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys(): out[k] = fh.get_tensor(k)
    return out
A, B, C = tensors("ft_a"), tensors("ft_b"), tensors("base")
def exact(vs, w):
    us = [v / v.norm() for v in vs]
    M = sum(wi * u for wi, u in zip(w, us))
    return M / M.norm() * sum(wi * v.norm() for wi, v in zip(w, vs))
for case in ("karcher", "multislerp", "multislerp_base"):
    worst = {k: (0.0, "") for k in ("new", "old", "mergekit")}
    off = dict.fromkeys(worst, 0)
    for key in sorted(A):
        a, b, c = A[key], B[key], C[key]
        base = c.double().flatten() if case == "multislerp_base" else None
        vs = [t.double().flatten() - (base if base is not None else 0) for t in (a, b)]
        w = [0.4, 0.6] if base is not None else [0.5, 0.5]
        want = exact(vs, w) + (base if base is not None else 0)
        af, bf, cf = a.float(), b.float(), c.float()
        if case == "karcher":
            got = {"new": merge("karcher", [a, b]), "old": old_karcher(torch.stack([af, bf])),
                   "mergekit": mergekit("karcher", [af, bf], None, max_iter=10, tol=1e-5)}
        else:
            bb, bbf = (c, cf) if base is not None else (None, None)
            got = {"new": merge("multislerp", [a, b], bb, weights(*w)),
                   "old": old_multislerp(torch.stack([af, bf]), bbf, w),
                   "mergekit": mergekit("multislerp", [cf, af, bf] if base is not None else [af, bf],
                                        0 if base is not None else None, weight=w)}
        scale = float(want.abs().max())
        for k, g in got.items():
            rel = float((g.double().flatten() - want).abs().max()) / scale
            if rel > worst[k][0]: worst[k] = (rel, key)
            off[k] += rel > 1e-5
    for k in worst:
        print(f"{case:16s} {k:9s} max |x - exact| / max|exact| = {worst[k][0]:.2e} ({worst[k][1]}); tensors above 1e-5: {off[k]}/{len(A)}", flush=True)
