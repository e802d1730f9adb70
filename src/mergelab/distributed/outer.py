"""The outer reduction: the workers' pseudo-gradients -> the one the outer optimizer steps with.

`mean` is DiLoCo's: sum over workers with an all-reduce of flat buckets, divided
by the number of workers taking part. Any other name is a mergelab method
applied to the workers' pseudo-gradients, all-gathered so that every worker
holds all of them and computes the same merge.

How a merge method sees a pseudo-gradient. Worker i's pseudo-gradient is
Delta_i = theta_global - theta_i, so tau_i = -Delta_i = theta_i - theta_global
is exactly worker i's task vector with the global model as base. Methods that
need (or can use) a base get tau_i and a zero base; methods without one get
tau_i as their models. The merged task vector tau becomes the pseudo-gradient
-tau. For every method defined on task vectors (task_arithmetic, ties, dare_*,
breadcrumbs*, della*, sce, tsv, iso_*, model_stock) this is the same as
merging the workers' full models with the global model as base; metric-weighted
means (linear, fisher, optimizer_aware, preconditioned) are linear, so merging
tau_i equals merging theta_i and subtracting theta_global. Only methods that
look at absolute weights (slerp, nuslerp, karcher, multislerp) differ: they act
on the geometry of the updates themselves.

A method's per-model `weight`, when not given, is 1/W for each of the W workers
taking part (linear is then exactly the mean).

A worker whose pseudo-gradient holds NaN/Inf is left out of that step: the
workers first all-reduce a vector of "finite" flags (every worker the same
answer), the bad worker contributes zeros (or its gathered row is dropped) and
the mean divides by the number of good workers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab.distributed.buckets import dequantize, flatten, make_buckets, quantize, unflatten
from mergelab.distributed.comm import Comm, Handle
from mergelab.distributed.flat import flat_views, sub_kernel


class WorkerLeftOut(UserWarning):
    """A worker's pseudo-gradient was not finite; it was left out of an outer step."""


@dataclasses.dataclass(frozen=True)
class OuterMerge:
    """How pseudo-gradients are combined: 'mean' or a mergelab method with its parameters."""

    method: str = "mean"
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0

    @property
    def gathers(self) -> bool:
        return self.method != "mean"

    def check(self, world_size: int) -> None:
        """Raise MergeError now for an unknown method or bad parameters (dry merge of random data)."""
        if self.method == "mean":
            if self.params:
                raise ValueError(f"outer_merge 'mean' takes no parameters, got {dict(self.params)}")
            return
        from mergelab.methods import REGISTRY

        spec = REGISTRY.get(self.method)
        if spec is None:
            from mergelab.errors import MergeError

            raise MergeError(f"outer_merge {self.method!r} is not a mergelab method; "
                             f"choose 'mean' or one of: {', '.join(sorted(REGISTRY))}")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(world_size, 4, generator=gen)
        self.merge(x, torch.ones_like(x) if spec.needs_stats else None, name="check", step=0)

    def merge(self, tau: Tensor, stats: Tensor | None, *, name: str, step: int) -> Tensor:
        """tau (W, *shape) task vectors of the workers taking part -> merged (*shape)."""
        from mergelab.methods import REGISTRY
        from mergelab.methods.calls import merge_tensors

        spec = REGISTRY[self.method]  # one lookup, not a description of every method
        base = torch.zeros_like(tau[0]) if spec.base != "ignored" else None
        params = dict(self.params)
        if "weight" in spec.parameter_names() and "weight" not in params:
            params["weight"] = 1.0 / tau.shape[0]  # equal weights summing to 1: linear is then the mean
        return merge_tensors(self.method, list(tau), base=base,
                             stats=list(stats) if stats is not None else None,
                             seed=self.seed + step, name=name, **params)


@dataclasses.dataclass
class _Pending:
    grads: list[Tensor]
    ok: Tensor  # (W,) 1 where a worker's pseudo-gradient was finite
    handles: list[Handle]
    results: list[Any]  # per bucket: summed flat tensor, or gathered (W, n) buffer
    stats: list[Tensor] | None
    inputs: tuple | None = None  # (globals_, locals_, this worker finite) of an optimistic start
    flags_handle: Handle | None = None  # the flags' all-reduce of an optimistic start


class FragmentReducer:
    """Reduces one fragment's pseudo-gradients; `start` launches, `finish` waits and returns."""

    def __init__(self, comm: Comm, names: Sequence[str], shapes_like: Sequence[Tensor], merge: OuterMerge, *,
                 quantize: str = "none", bucket_cap_bytes: int = 25 * 2**20):
        self.comm, self.names, self.merge, self.quant = comm, list(names), merge, quantize
        self.buckets = make_buckets(shapes_like, bucket_cap_bytes)
        self.pending: _Pending | None = None
        self.bufs: list[Tensor] | None = None  # persistent buckets of the plain mean
        self.flat: Tensor | None = None  # their one flat buffer, when the fragment has one dtype and device

    def start(self, globals_: list[Tensor], locals_: list[Tensor], stats: list[Tensor] | None = None, *,
              step: int, optimistic: bool = False) -> None:
        """Pseudo-gradients globals_[i] - locals_[i], written straight into flat bucket buffers (float32,
        float64 for float64 parameters; for the plain mean persistent ones, with the finiteness check
        in the same pass), the workers' "finite" flags agreed, then every bucket's collective launched.

        optimistic (plain mean only; the caller promises not to change globals_ or locals_ before
        finishing): each bucket's all-reduce starts as soon as the bucket is written, while the next
        is prepared, and the flags follow the buckets. In the rare sync where a worker was not finite,
        finishing computes the pseudo-gradients again and reduces them a second time without it."""
        assert self.pending is None, "a fragment sync is already in flight"
        self.step = step
        grads = list(locals_)  # shapes only, from here on
        plain = not self.merge.gathers and self.quant == "none"
        if plain and optimistic:
            bufs = self._buffers(locals_)
            finite, handles = True, []
            for idx, buf in zip(self.buckets, bufs):
                finite &= _pseudo_gradient_into(buf, [globals_[i] for i in idx], [locals_[i] for i in idx])
                handles.append(self.comm.all_reduce_sum(buf, async_op=True))
            flags = self._flags(finite)
            self.pending = _Pending(grads, flags, handles, bufs, None, inputs=(globals_, locals_, finite),
                                    flags_handle=self.comm.all_reduce_sum(flags, async_op=True))
            return
        if plain:
            flats = self._buffers(locals_)
            finite = True
            for idx, buf in zip(self.buckets, flats):
                finite &= _pseudo_gradient_into(buf, [globals_[i] for i in idx], [locals_[i] for i in idx])
        else:
            flats = [_pseudo_gradient_bucket([globals_[i] for i in idx], [locals_[i] for i in idx])
                     for idx in self.buckets]
            finite = all(bool(torch.isfinite(f.sum())) for f in flats)
        flags = self._agree_finite(flats, finite)
        handles, results = [], []
        for flat in flats:
            if plain:
                handles.append(self.comm.all_reduce_sum(flat, async_op=True))
                results.append(flat)
            else:
                payload = flat if self.quant == "none" else quantize(flat, self.quant)
                out, h = self.comm.all_gather(payload, async_op=True)
                handles.append(h)
                results.append(out)
        gathered_stats = None
        if stats is not None:
            gathered_stats = []
            for idx in self.buckets:
                out, h = self.comm.all_gather(flatten([stats[i] for i in idx], torch.float32), async_op=True)
                handles.append(h)
                gathered_stats.append(out)
        self.pending = _Pending(grads, flags, handles, results, gathered_stats)

    def _flags(self, finite: bool) -> Tensor:
        flags = torch.zeros(self.comm.world_size)
        rank = self.comm.rank
        if rank is not None:  # None: a torchft replica that is healing this step (it sends zeros)
            flags[rank] = 1.0 if finite else 0.0
        return flags

    def _settle(self, p: _Pending) -> None:
        """After an optimistic start: wait for the flags; if a worker was not finite, reduce again
        without it (every worker recomputes its pseudo-gradients; the bad one sends zeros)."""
        if p.flags_handle is None:
            return
        p.flags_handle.wait()
        p.flags_handle = None
        if bool((p.ok > 0.5).all()):
            return
        for h in p.handles:
            h.wait()
        globals_, locals_, finite = p.inputs
        for idx, buf in zip(self.buckets, p.results):
            if finite:
                _pseudo_gradient_into(buf, [globals_[i] for i in idx], [locals_[i] for i in idx])
            else:
                buf.zero_()
        p.handles = [self.comm.all_reduce_sum(buf, async_op=True) for buf in p.results]

    def _agree_finite(self, flats: list[Tensor], finite: bool) -> Tensor:
        """All-reduce one "finite" flag per worker; a non-finite worker's buckets are zeroed."""
        flags = self._flags(finite)
        self.comm.all_reduce_sum(flags)
        if not finite:
            for f in flats:
                f.zero_()
        return flags

    def _buffers(self, like: Sequence[Tensor]) -> list[Tensor]:
        """The persistent flat pseudo-gradient buffer of each bucket (allocated at the first sync: fresh
        memory costs a page fault per page on first touch). When every tensor of the fragment has the
        same dtype and device, the buckets are consecutive slices of one flat buffer, `self.flat`."""
        if self.bufs is None:
            dtypes = [_grad_dtype(t) for t in like]
            if len(set(dtypes)) == 1 and len({t.device for t in like}) == 1:
                self.flat, _ = flat_views(like, dtype=dtypes[0])
                self.bufs, offset = [], 0
                for idx in self.buckets:
                    n = sum(like[i].numel() for i in idx)
                    self.bufs.append(self.flat[offset:offset + n])
                    offset += n
            else:
                self.bufs = [torch.empty(sum(like[i].numel() for i in idx), dtype=dtypes[idx[0]],
                                         device=like[idx[0]].device) for idx in self.buckets]
        return self.bufs

    def finish_plain(self) -> Iterator[tuple[list[int], Tensor]] | None:
        """Plain mean: the number of workers taking part is `self.count`; returns an iterator that waits
        for each bucket's all-reduce in turn and yields (its tensors' indices, its summed flat buffer,
        undivided), so the caller can work on one bucket while the next is still being reduced; or None
        if no worker was finite."""
        p, self.pending = self.pending, None
        assert p is not None and not self.merge.gathers and self.quant == "none"
        self._settle(p)
        self.count = self._count_ok(p.ok)
        if self.count == 0:
            for h in p.handles:
                h.wait()
            return None

        def buckets():
            for h, idx, buf in zip(p.handles, self.buckets, p.results):
                h.wait()
                yield idx, buf

        return buckets()

    def _count_ok(self, ok: Tensor) -> int:
        keep = ok > 0.5
        n_ok = int(keep.sum())
        if n_ok < self.comm.world_size:
            bad = [r for r in range(self.comm.world_size) if not keep[r]]  # ranks in this step's group
            warnings.warn(f"outer step {self.step}: pseudo-gradient of worker(s) {bad} holds NaN/Inf; "
                          f"left out of this step ({n_ok} of {self.comm.world_size} workers averaged)",
                          WorkerLeftOut, stacklevel=4)
        return n_ok

    def finish(self) -> list[Tensor] | None:
        """The merged pseudo-gradient of every tensor (float32), or None if no worker was finite."""
        p, self.pending = self.pending, None
        assert p is not None, "finish() without start()"
        self._settle(p)
        for h in p.handles:
            h.wait()
        keep = p.ok > 0.5
        n_ok = self._count_ok(p.ok)
        if n_ok == 0:
            return None
        out: list[Tensor | None] = [None] * len(p.grads)
        for b, idx in enumerate(self.buckets):
            like = [p.grads[i] for i in idx]
            res = p.results[b]
            if not self.merge.gathers and self.quant == "none":
                merged = unflatten(res.div_(n_ok), like)  # views of the reduced bucket
            else:
                numel = sum(t.numel() for t in like)
                rows = res if self.quant == "none" else torch.stack(
                    [dequantize(res[w], self.quant, numel) for w in range(self.comm.world_size)])
                rows = rows[keep]  # (n_ok, numel) in rank order
                if not self.merge.gathers:
                    merged = unflatten(_ordered_mean(rows), like)
                else:
                    per_t = unflatten(rows, like)  # each (n_ok, *shape)
                    st = unflatten(p.stats[b][keep], like) if p.stats is not None else [None] * len(like)
                    merged = [-self.merge.merge(-x, s, name=self.names[i], step=self.step)
                              for i, x, s in zip(idx, per_t, st)]
            for i, m in zip(idx, merged):
                out[i] = m
        return out  # type: ignore[return-value]


def _grad_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _pseudo_gradient_into(flat: Tensor, globals_: Sequence[Tensor], locals_: Sequence[Tensor]) -> bool:
    """flat (sum numel,) <- globals_[i] - locals_[i], in place, tensor by tensor; True if all finite.

    With numba, subtraction and finiteness check are one compiled pass (sub_finite); else torch.sub and
    a sum (NaN and Inf propagate through a sum; it overflows only for entries near 1e31, a diverged
    worker that is better left out as well)."""
    kernel = sub_kernel(flat)
    finite, offset = True, 0
    for g, x in zip(globals_, locals_):
        n = x.numel()
        out = flat[offset:offset + n].view(x.shape)
        same = g.dtype == x.dtype == flat.dtype and g.device == x.device == flat.device
        if same and kernel is not None and g.is_contiguous() and x.is_contiguous():
            finite &= bool(kernel(g.view(-1).numpy(), x.detach().view(-1).numpy(), out.view(-1).numpy()))
            offset += n
            continue
        if same:
            torch.sub(g, x.detach(), out=out)
        else:  # other dtypes or a backup on another device: widen first, then subtract
            torch.sub(g.to(flat.device, flat.dtype), x.detach().to(flat.dtype), out=out)
        finite &= bool(torch.isfinite(out.sum()))
        offset += n
    return finite


def _pseudo_gradient_bucket(globals_: Sequence[Tensor], locals_: Sequence[Tensor]) -> Tensor:
    """A new flat (sum numel,) buffer of globals_[i] - locals_[i], in float32 (float64 for float64 tensors)."""
    flat = torch.empty(sum(t.numel() for t in locals_), dtype=_grad_dtype(locals_[0]), device=locals_[0].device)
    offset = 0
    for g, x in zip(globals_, locals_):  # (.to is a no-op where dtype and device already agree)
        out = flat[offset:offset + x.numel()].view(x.shape)
        torch.sub(g.to(x.device, flat.dtype), x.detach().to(flat.dtype), out=out)
        offset += x.numel()
    return flat


def _ordered_mean(rows: Tensor) -> Tensor:
    """Mean over the first axis, summed in row order (the same bits on every worker)."""
    total = rows[0].clone()
    for r in rows[1:]:
        total += r
    return total / rows.shape[0]
