"""Permutation specs: which axes of which tensors share one permutation of hidden units.

A network's function is unchanged when the units of a hidden layer are permuted
together with every tensor axis that reads or writes them: the rows of the layer
that produces them, the columns of every layer that consumes them, their biases
and normalisation parameters. A *group* is one such permutation; a spec maps
every tensor of a state dict to, per axis, the group acting on it (or None).

An axis of size n acted on by a group of size G is read as `chunks` consecutive
blocks of G units, each unit `n / (chunks * G)` entries wide: an attention head
is a unit `head_dim` wide, a flattened conv channel a unit `H * W` wide, and
GPT-2's fused q|k|v projection has three chunks of the head group.

Convention: a permutation p of group g takes B to A's basis with
    B_aligned[unit i] = B[unit p[i]]   on every axis of g.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergelab.errors import MergeError, ShapeMismatch


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis acted on by `group`, laid out as `chunks` consecutive copies of the group's units."""

    group: str
    chunks: int = 1


AxisLike = Axis | str | None


def _axis(a: AxisLike) -> Axis | None:
    return Axis(a) if isinstance(a, str) else a


@dataclasses.dataclass
class PermutationSpec:
    """Groups (name -> number of units) and, per tensor, the group of each axis.

    `taps` lists, per group, where its units can be observed while the model runs
    (module name, "out" for the module's output or "in" for its input); activation
    matching, REPAIR and ZipIt read activations there. Specs derived by
    `spec_from_module` or `spec_for_hf` fill it; a hand-written spec may leave it empty.
    """

    groups: dict[str, int]
    axes: dict[str, tuple[Axis | None, ...]]
    taps: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, groups: Mapping[str, int], axes: Mapping[str, Sequence[AxisLike]],
              taps: Mapping[str, list[tuple[str, str]]] | None = None) -> PermutationSpec:
        """A spec from plain values: an axis may be given as a group name, an Axis or None."""
        return cls(dict(groups), {k: tuple(_axis(a) for a in v) for k, v in axes.items()}, dict(taps or {}))

    def group_axes(self) -> dict[str, list[tuple[str, int, int]]]:
        """Group -> every (tensor, axis index, chunks) it acts on."""
        out: dict[str, list[tuple[str, int, int]]] = {g: [] for g in self.groups}
        for name, axes in self.axes.items():
            for i, ax in enumerate(axes):
                if ax is not None:
                    out[ax.group].append((name, i, ax.chunks))
        return out

    def check(self, state: Mapping[str, Tensor], what: str = "model") -> None:
        """Raise a MergeError naming the first tensor that does not fit the spec."""
        missing = [k for k in self.axes if k not in state]
        unknown = [k for k in state if k not in self.axes]
        if missing or unknown:
            raise MergeError(
                f"{what} does not fit the permutation spec: tensors missing {missing[:3]}, not in the spec "
                f"{unknown[:3]}; the models must have the same architecture and tensor names")
        for name, axes in self.axes.items():
            shape = tuple(state[name].shape)
            if len(axes) != len(shape):
                raise ShapeMismatch(f"{what} tensor {name} has shape {shape} but the spec gives it "
                                    f"{len(axes)} axes")
            for i, ax in enumerate(axes):
                if ax is None:
                    continue
                if ax.group not in self.groups:
                    raise MergeError(f"spec: tensor {name} axis {i} names unknown group {ax.group!r}")
                units = self.groups[ax.group] * ax.chunks
                if shape[i] % units:
                    raise ShapeMismatch(
                        f"{what} tensor {name} axis {i} has {shape[i]} entries, not a multiple of "
                        f"{units} units of group {ax.group!r}; the models must have the same widths")


def permute_axis(t: Tensor, axis: int, perm: Tensor, chunks: int = 1) -> Tensor:
    """t with the units of `axis` reordered: unit i of the result is unit perm[i] of t.

    The axis (size n) is viewed as (chunks, G, n / (chunks G)) and the middle dimension indexed.
    """
    n, g = t.shape[axis], perm.numel()
    moved = t.movedim(axis, 0)
    blocks = moved.reshape(chunks, g, n // (chunks * g), *moved.shape[1:])  # (chunks, G, width, ...)
    out = blocks.index_select(1, perm).reshape(moved.shape)
    return out.movedim(0, axis)


def unit_view(t: Tensor, axis: int, groups: int, chunks: int = 1) -> Tensor:
    """(G, rest) view of `t` with the G units of `axis` first and everything else flattened."""
    n = t.shape[axis]
    moved = t.movedim(axis, 0)
    blocks = moved.reshape(chunks, groups, n // (chunks * groups), *moved.shape[1:])
    return blocks.transpose(0, 1).reshape(groups, -1)


def apply_permutations(spec: PermutationSpec, state: Mapping[str, Tensor], perms: Mapping[str, Tensor],
                       skip: tuple[str, int] | None = None) -> dict[str, Tensor]:
    """A new state dict with every group's permutation applied to its axes (`skip`: one axis left alone)."""
    return {name: permute_tensor(spec, name, t, perms, skip) for name, t in state.items()}


def permuted_axes(spec: PermutationSpec, name: str, perms: Mapping[str, Tensor]) -> list[int]:
    """The axes of tensor `name` that one of `perms` acts on (none: the tensor stays as it is)."""
    return [i for i, ax in enumerate(spec.axes.get(name, ())) if ax is not None and ax.group in perms]


def permute_tensor(spec: PermutationSpec, name: str, t: Tensor, perms: Mapping[str, Tensor],
                   skip: tuple[str, int] | None = None) -> Tensor:
    """Tensor `name` of a state dict with every group's permutation applied to its axes (`skip`: one left alone)."""
    for i in permuted_axes(spec, name, perms):
        if (name, i) != skip:
            ax = spec.axes[name][i]
            t = permute_axis(t, i, perms[ax.group], ax.chunks)
    return t


def identity_perms(spec: PermutationSpec) -> dict[str, Tensor]:
    return {g: torch.arange(n) for g, n in spec.groups.items()}


def random_perms(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A random permutation of every group (for tests and experiments)."""
    return {g: torch.randperm(n, generator=generator) for g, n in spec.groups.items()}


def inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv
