"""Finding the permutations: weight matching and activation matching.

Both solve, per group, a linear assignment problem max_p sum_i C[i, p[i]] with
scipy.optimize.linear_sum_assignment; they differ in the similarity C between
unit i of model A and unit j of model B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from mergelab.align.spec import PermutationSpec, apply_permutations, identity_perms, permute_tensor, unit_view
from mergelab.errors import MergeError
from mergelab.extras import require


@dataclasses.dataclass
class MatchResult:
    """Permutations (group -> LongTensor p, B_aligned[i] = B[p[i]]) and how they were found."""

    perms: dict[str, Tensor]
    objective: list[float]  # weight matching: objective at the start and after every sweep that improved it
    sweeps: int = 0


def objective(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
              perms: Mapping[str, Tensor]) -> float:
    """Weight-matching objective sum_l <W_a^l, P_l W_b^l P_{l-1}^T> over tensors with a permuted axis.

    Computed directly: B is permuted with every group's permutation and the inner
    products with A summed in float64.
    """
    permuted = apply_permutations(spec, state_b, perms)
    return float(sum((state_a[k].double() * permuted[k].double()).sum()
                     for k, axes in spec.axes.items() if any(a is not None for a in axes)))


def _lap(cost: Tensor) -> Tensor:
    solve = require("scipy.optimize", "permutation alignment").linear_sum_assignment
    _, cols = solve(cost.double().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], *,
                    max_sweeps: int = 100, tol: float = 1e-3, seed: int = 0,
                    init: Mapping[str, Tensor] | None = None) -> MatchResult:
    """Git Re-Basin weight matching: coordinate descent over permutation groups.

    Maximises sum_l <W_a^l, P_l W_b^l P_{l-1}^T>. Holding every other group fixed, the
    objective is linear in one group's permutation P_g with similarity
        C_g[i, j] = sum over axes of g: <A[unit i], B'[unit j]>,
    B' being B with every other axis already permuted; linear_sum_assignment gives the
    best P_g. Groups are visited in a random order each sweep; a group's new permutation
    is kept only if it raises the objective, so the objective never decreases, and the
    descent stops after a sweep that raised it by less than `tol` of its value. The objective
    is recomputed from the weights in float64 after every sweep (MatchResult.objective). Ainsworth, Hayase & Srinivasa,
    2022, "Git Re-Basin", arXiv:2209.04836, Algorithm 1.

    Args:
        spec: the groups and the axes they act on.
        state_a, state_b: state dicts of the reference A and the model B to align.
        max_sweeps: cap on passes over all groups.
        tol: stop when a sweep gains less than tol * |objective|. Sweeps after the first few
            keep finding gains of ~0.1% each (a 3 x 512 MLP: 6 sweeps to within 1% of the value
            30 sweeps reach); 0 runs until no group moves (see docs/results-alignment.md).
        seed: order in which groups are visited.
        init: starting permutations (default identity).

    Returns:
        MatchResult with the permutations and the objective at the start and after each sweep.
    """
    group_axes = spec.group_axes()
    a = {k: v.detach().float() for k, v in state_a.items() if k in spec.axes}
    b = {k: v.detach().float() for k, v in state_b.items() if k in spec.axes}
    perms = {g: p.clone() for g, p in (init or identity_perms(spec)).items()}
    constant, varying = _split_terms(spec, group_axes, a, b)
    gen = torch.Generator().manual_seed(seed)
    history = [objective(spec, a, b, perms)]
    names = list(spec.groups)
    sweep = 0
    for sweep in range(1, max_sweeps + 1):
        improved = False
        for g in (names[i] for i in torch.randperm(len(names), generator=gen).tolist()):
            cost = constant[g].clone()
            for name, axis, chunks in varying[g]:
                others = permute_tensor(spec, name, b[name], perms, skip=(name, axis))
                cost += unit_view(a[name], axis, spec.groups[g], chunks) @ \
                    unit_view(others, axis, spec.groups[g], chunks).T  # (G, rest) @ (rest, G)
            trial = _better(spec, g, cost, varying, a, b, perms, history[-1])
            if trial is not None:
                perms, improved = trial, True
        if not improved:
            break
        history.append(objective(spec, a, b, perms))
        if history[-1] - history[-2] < tol * abs(history[-2]):
            break
    return MatchResult(perms=perms, objective=history, sweeps=sweep)


def _better(spec, g, cost, varying, a, b, perms, current: float) -> dict[str, Tensor] | None:
    """`perms` with group g's best assignment under `cost`, or None when it does not raise the objective."""
    new = _lap(cost)
    rows = torch.arange(len(new))
    gain = float(cost[rows, new].sum() - cost[rows, perms[g]].sum())
    if gain <= 1e-6 * max(1.0, abs(current)):  # float32 similarities: ignore rounding-size gains
        return None
    trial = {**perms, g: new}
    if _quadratic(g, varying):  # g on two axes of one tensor: C_g is only a linearisation
        if objective(spec, a, b, trial) <= objective(spec, a, b, perms):
            return None
    return trial


def _split_terms(spec, group_axes, a, b):
    """Per group: the similarity from tensors whose other axes are never permuted (computed once,
    float64), and the (tensor, axis, chunks) terms that change as other groups move."""
    constant, varying = {}, {}
    for g, entries in group_axes.items():
        n = spec.groups[g]
        constant[g] = torch.zeros(n, n, dtype=torch.float64)
        varying[g] = []
        for name, axis, chunks in entries:
            if sum(x is not None for x in spec.axes[name]) == 1:
                constant[g] += (unit_view(a[name], axis, n, chunks) @ unit_view(b[name], axis, n, chunks).T).double()
            else:
                varying[g].append((name, axis, chunks))
    return constant, varying


def _quadratic(g: str, varying) -> bool:
    names = [name for name, _, _ in varying[g]]
    return len(names) != len(set(names))


# ----------------------------------------------------------------------------- activation matching


def batches(data) -> Iterable:
    """Model inputs from a tensor (split in batches of 256), a list of batches or a DataLoader;
    (x, y) pairs give x."""
    if isinstance(data, Tensor):
        yield from data.split(256)
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


def run_model(model: nn.Module, x) -> None:
    if isinstance(x, Mapping):
        model(**x)
    else:
        model(x)


def _channel_axis(module: nn.Module, x: Tensor) -> int:
    conv_like = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return 1 if isinstance(module, conv_like) and x.dim() > 2 else x.dim() - 1


def tap_features(model: nn.Module, taps: list[tuple[str, str]], x, what: str) -> list[Tensor]:
    """Activations at each tap for input x, each as (samples, features) float64."""
    modules = dict(model.named_modules())
    found: dict[int, Tensor] = {}
    handles = []
    for i, (name, where) in enumerate(taps):
        if name not in modules:
            raise MergeError(f"{what} has no module {name!r} to read activations from; the models must have "
                             "the same architecture as the spec")
        mod = modules[name]

        def grab(t, i=i, mod=mod):
            t = t[0] if isinstance(t, (tuple, list)) else t
            ax = _channel_axis(mod, t)
            found[i] = t.detach().movedim(ax, -1).reshape(-1, t.shape[ax]).double()

        if where == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, args, grab=grab: grab(args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, grab=grab: grab(out)))
    try:
        with torch.no_grad():
            run_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return [found[i] for i in range(len(taps))]


def correlations(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, data) -> dict[str, Tensor]:
    """Per group, the (G, G) similarity sum over taps and unit width of corr(a_unit_i[k], b_unit_j[k])."""
    flat = [(g, tap) for g, taps in spec.taps.items() for tap in taps]
    stats: dict[int, list] = {}
    for x in batches(data):
        fa = tap_features(model_a, [tap for _, tap in flat], x, "model A")
        fb = tap_features(model_b, [tap for _, tap in flat], x, "model B")
        for t, (xa, xb) in enumerate(zip(fa, fb)):
            s = [xa.shape[0], xa.sum(0), xb.sum(0), xa.T @ xb, (xa * xa).sum(0), (xb * xb).sum(0)]
            acc = stats.setdefault(t, [0] * 6)
            for k in range(6):
                acc[k] = acc[k] + s[k]
    if not stats:
        raise MergeError("activation matching got no data batches (or the spec has no taps)")
    out: dict[str, Tensor] = {}
    for t, (n, sa, sb, sab, saa, sbb) in stats.items():
        g = flat[t][0]
        ma, mb = sa / n, sb / n
        cov = sab / n - ma[:, None] * mb[None, :]
        std_a = (saa / n - ma * ma).clamp_min(0).sqrt()
        std_b = (sbb / n - mb * mb).clamp_min(0).sqrt()
        corr = torch.nan_to_num(cov / (std_a[:, None] * std_b[None, :] + 1e-12))  # (F, F); dead units: 0
        units = spec.groups[g]
        width = corr.shape[0] // units
        block = corr.reshape(units, width, units, width).diagonal(dim1=1, dim2=3).sum(-1)  # (G, G)
        out[g] = out.get(g, 0) + block
    return out


def activation_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, data) -> MatchResult:
    """Activation matching: each group's permutation maximises the summed correlation of activations.

    C_g[i, j] = sum over the group's taps and the unit's width k of corr(a_i[k], b_j[k]),
    correlations taken over all examples (and positions / pixels); one linear assignment
    per group, each group solved on its own. Ainsworth et al., 2022, arXiv:2209.04836,
    Sec. 3.1; Li et al., 2015, "Convergent learning", arXiv:1511.07543.

    Args:
        spec: groups with their taps (where the units' activations are read).
        model_a, model_b: the two models (unchanged; run in eval mode).
        data: inputs (tensor, list of batches or DataLoader; dicts are passed as keyword arguments).
    """
    missing = [g for g in spec.groups if g not in spec.taps]
    if missing:
        raise MergeError(f"activation matching needs the activations of every group; the spec has no taps for "
                         f"{missing[:3]} (use weight matching, or add taps)")
    modes = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    try:
        sims = correlations(spec, model_a, model_b, data)
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    return MatchResult(perms={g: _lap(sims[g]) for g in spec.groups}, objective=[], sweeps=1)
