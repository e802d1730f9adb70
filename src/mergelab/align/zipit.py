"""ZipIt: merge models trained on different tasks by merging correlated features,
across the two models and within each.

For every permutation group the n_A + n_B features of both models (read at the
group's taps on data) are correlated with each other. Greedily, the most correlated
pair is merged (averaged) and removed, until n_A features remain: a pair may come from
A and B (like a permutation) or from one model (features redundant within it). This
gives a merge matrix M (n_A x (n_A + n_B), 1/2 for a pair, 1 for a feature left alone)
and an unmerge matrix U ((n_A + n_B) x n_A, a 1 where a feature went). Every layer
whose output is group o and input group i becomes

    W = M_o,A W_A U_i,A + M_o,B W_B U_i,B

(a bias or norm vector on group o: M_o,A v_A + M_o,B v_B; a layer reading the network's
input: U is the identity; the output layer averages the two models' outputs, 1/2 (...)).
Partial zipping stops after the first `layers` groups: later groups keep all n_A + n_B
features (M = U = I), so the model widens into both models' tails side by side and
their outputs are averaged. Models of different widths can be zipped (to A's widths).
Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, 2023, "ZipIt! Merging Models from
Different Tasks without Training", arXiv:2305.03053.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mergelab.align.matching import batches, tap_features
from mergelab.align.spec import PermutationSpec
from mergelab.align.trace import spec_from_module
from mergelab.errors import MergeError, ShapeMismatch


def zip_matrices(corr: Tensor, n_a: int, within: bool = True) -> tuple[Tensor, Tensor]:
    """Greedy feature merging: (M, U) from the (n_A + n_B)^2 correlation matrix of both models' features.

    The most correlated pair of clusters (average correlation of their members) is merged
    until n_A clusters remain; a cluster holds at most ceil((n_A + n_B) / n_A) features, so
    for equal widths every feature is merged exactly once, into a pair. With within=False a
    cluster may not hold two features of one model (for equal widths, M and U then describe
    a permutation).
    """
    total = corr.shape[0]
    cap = -(-total // n_a)
    side = (torch.arange(total) >= n_a).double()  # 0: model A, 1: model B
    members: dict[int, list[int]] = {k: [k] for k in range(total)}
    link = corr.double().clone()  # sum of correlations between the members of two clusters
    size = torch.ones(total, dtype=torch.float64)
    from_b = side.clone()  # features of model B in each cluster
    alive = torch.ones(total, dtype=torch.bool)

    def allowed(rows: torch.Tensor) -> torch.Tensor:  # (len(rows), total): may these clusters merge?
        both = size[rows, None] + size[None, :]
        ok = alive[rows, None] & alive[None, :] & (both <= cap)
        if not within:  # no two features of one model in a cluster
            nb = from_b[rows, None] + from_b[None, :]
            ok &= (nb <= 1) & ((both - nb) <= 1)
        ok[torch.arange(len(rows)), rows] = False
        return ok

    everyone = torch.arange(total)
    score = torch.where(allowed(everyone), link, -torch.inf)  # average linkage = link / (size_i size_k)
    while len(members) > n_a:
        i, j = divmod(int(score.argmax()), total)
        if score[i, j] == -torch.inf:
            raise MergeError("ZipIt ran out of feature pairs to merge; use within=True for models of different "
                             "widths")
        members[i] += members.pop(j)
        link[i, :] += link[j, :]
        link[:, i] = link[i, :]
        size[i] += size[j]
        from_b[i] += from_b[j]
        alive[j] = False
        score[j, :] = score[:, j] = -torch.inf
        row = torch.where(allowed(torch.tensor([i]))[0], link[i] / (size[i] * size), -torch.inf)
        score[i, :] = score[:, i] = row
    clusters = sorted(members.values(), key=min)  # merged features in the order of their first member
    M = torch.zeros(len(clusters), total, dtype=torch.float64)
    U = torch.zeros(total, len(clusters), dtype=torch.float64)
    for f, group in enumerate(clusters):
        for k in group:
            M[f, k] = 1.0 / len(group)
            U[k, f] = 1.0
    return M, U


def _mix(t: Tensor, axis: int, mat: Tensor) -> Tensor:
    """Apply mat (n_out, G) to the G units of `axis` (each unit `width` entries wide)."""
    g = mat.shape[1]
    moved = t.movedim(axis, 0)
    width = moved.shape[0] // g
    units = moved.reshape(g, width, *moved.shape[1:])  # (G, width, ...)
    mixed = torch.tensordot(mat.to(t.dtype), units, dims=([1], [0]))  # (n_out, width, ...)
    return mixed.reshape(mat.shape[0] * width, *moved.shape[1:]).movedim(0, axis)


def _zip_tensor(name: str, ta: Tensor, tb: Tensor, axes, mats: dict[str, tuple[Tensor, Tensor]],
                sizes_a: dict[str, int]) -> Tensor:
    """W = M_o,A W_A U_i,A + M_o,B W_B U_i,B on the permuted axes (axis 0: output, axis 1: input)."""
    grouped = [(k, ax.group) for k, ax in enumerate(axes) if ax is not None]
    if not grouped:
        return (ta + tb) / 2
    if any(k > 1 for k, _ in grouped) or any(ax.chunks != 1 for ax in axes if ax is not None):
        raise MergeError(f"ZipIt cannot merge tensor {name}: its permuted axes are not (output, input) of a layer")
    parts = []
    for t, side in ((ta, "A"), (tb, "B")):
        for k, g in grouped:
            M, U = mats[g]
            n_a = sizes_a[g]
            if k == 0:
                t = _mix(t, 0, M[:, :n_a] if side == "A" else M[:, n_a:])
            else:
                t = _mix(t, 1, (U[:n_a] if side == "A" else U[n_a:]).T)
        parts.append(t)
    out = parts[0] + parts[1]
    if 0 not in [k for k, _ in grouped]:  # the output is fixed: average the two models' contributions
        out = out / 2
    return out


def zipit(model_a: nn.Module, model_b: nn.Module, data, *, layers: int | None = None, within: bool = True,
          spec_a: PermutationSpec | None = None, spec_b: PermutationSpec | None = None) -> nn.Module:
    """Merge two networks of one architecture (widths may differ) with ZipIt.

    Args:
        model_a, model_b: the networks (unchanged); the result has A's widths where zipped.
        data: inputs on which feature correlations are measured (both models see the same inputs).
        layers: zip only the first `layers` groups in the order the network runs them (partial
            zipping); the rest keep both models' features side by side. None zips every group.
        within: allow merging two features of the same model (ZipIt); False only pairs across models.
        spec_a, spec_b: permutation specs (default: traced).

    Returns:
        the merged nn.Module (a copy of A with merged, possibly wider, tensors), in eval mode.
    """
    spec_a = spec_a if spec_a is not None else spec_from_module(model_a)
    spec_b = spec_b if spec_b is not None else spec_from_module(model_b)
    if list(spec_a.groups) != list(spec_b.groups) or set(spec_a.axes) != set(spec_b.axes):
        raise MergeError("ZipIt: models A and B differ in structure (groups or tensor names); they must share an "
                         "architecture up to widths")
    order = list(spec_a.groups)
    zipped = set(order if layers is None else order[:layers])
    mats: dict[str, tuple[Tensor, Tensor]] = {}
    feats = _features(model_a, model_b, spec_a, data)
    for g in order:
        n_a, n_b = spec_a.groups[g], spec_b.groups[g]
        if g in zipped:
            mats[g] = zip_matrices(feats[g], n_a, within=within)
        else:
            eye = torch.eye(n_a + n_b, dtype=torch.float64)
            mats[g] = (eye, eye)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    state = {}
    for name, axes in spec_a.axes.items():
        if not sa[name].is_floating_point():
            state[name] = sa[name]
            continue
        state[name] = _zip_tensor(name, sa[name].double(), sb[name].double(), axes, mats,
                                  spec_a.groups).to(sa[name].dtype)
    return _build(model_a, state)


def _features(model_a, model_b, spec, data) -> dict[str, Tensor]:
    """Per group, the correlation matrix of [A's features, B's features] summed over the group's taps."""
    flat = [(g, tap) for g, taps in spec.taps.items() for tap in taps]
    missing = [g for g in spec.groups if g not in spec.taps]
    if missing:
        raise MergeError(f"ZipIt needs activations of every group; no taps for {missing[:3]}")
    sums: dict[int, list] = {}
    for model in (model_a, model_b):
        model.eval()
    with torch.no_grad():
        for x in batches(data):
            fa = tap_features(model_a, [t for _, t in flat], x, "model A")
            fb = tap_features(model_b, [t for _, t in flat], x, "model B")
            for t, (xa, xb) in enumerate(zip(fa, fb)):
                z = torch.cat([xa, xb], dim=1)  # (samples, n_A + n_B)
                acc = sums.setdefault(t, [0, 0, 0])
                acc[0] += z.shape[0]
                acc[1] = acc[1] + z.sum(0)
                acc[2] = acc[2] + z.T @ z
    out: dict[str, Tensor] = {}
    for t, (n, s1, s2) in sums.items():
        mean = s1 / n
        cov = s2 / n - mean[:, None] * mean[None, :]
        std = cov.diagonal().clamp_min(0).sqrt() + 1e-12
        corr = torch.nan_to_num(cov / (std[:, None] * std[None, :]))  # a dead unit correlates 0
        g = flat[t][0]
        out[g] = out.get(g, 0) + corr
    return out


def _build(template: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A copy of `template` holding `state`, whose tensors may be wider than the template's."""
    out = copy.deepcopy(template)
    for name, value in state.items():
        owner_name, _, attr = name.rpartition(".")
        owner = out.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value.clone(), requires_grad=owner._parameters[attr].requires_grad)
        elif attr in owner._buffers:
            owner._buffers[attr] = value.clone()
        else:
            raise ShapeMismatch(f"ZipIt: {name} is neither a parameter nor a buffer of the model")
    for mod in out.modules():  # keep the size attributes honest for repr and re-use
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            mod.out_channels, mod.in_channels = mod.weight.shape[:2]
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and mod.running_mean is not None:
            mod.num_features = mod.running_mean.shape[0]
    return out.eval()
