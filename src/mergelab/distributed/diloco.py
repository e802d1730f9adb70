"""DiLoCo, FedAvg and Streaming DiLoCo as a context manager around the user's training loop.

Algorithm (Douillard et al., 2023, arXiv:2311.08105), with torchft's semantics
(torchft 0.2.0, torchft/local_sgd.py): each worker runs `sync_every` (H) inner
optimizer steps from the global parameters theta; then

    Delta_i = theta - theta_i                       (worker i's pseudo-gradient)
    Delta   = mean_i Delta_i                        (or any mergelab method, see outer.py)
    theta  <- outer_optimizer.step(theta, grad=Delta)

and every worker continues from the new theta. DiLoCo's outer optimizer is
SGD(lr=0.7, momentum=0.9, nesterov=True); FedAvg (McMahan et al., 2017,
arXiv:1602.05629) is the same loop with SGD(lr=1), which sets theta to the
mean of the workers' models.

Streaming DiLoCo (Douillard et al., 2025, arXiv:2501.18512): the model is cut
into F fragments; fragment k is synced every H steps like above, but the
fragments take turns every H/F steps, so a sync moves 1/F of the model. A
fragment's reduction starts `fragment_sync_delay` (tau) inner steps before it
is applied and runs asynchronously meanwhile; the fragment's parameters are
then set to (1 - alpha) theta + alpha theta_i (alpha = fragment_update_alpha).

Faithful to torchft: the inner step counter, which fragment syncs when
(the number of syncs done modulo F), the backup of theta (on `backup_device`)
restored into the model before the outer step, the outer optimizer stepping
the model's own parameters, and only parameters (not buffers) being synced.
For the plain mean with a torch.optim.SGD outer optimizer (DiLoCo's, FedAvg's)
the same step is computed on flat buffers instead (flat.py: theta, momentum
and pseudo-gradients each one flat buffer, SGD's operations bit for bit, the
new theta written into the model in the same pass); any other outer
optimizer or merge goes through outer.step() as described.
Differences: the workers' models are checked to be alike and rank 0's initial
parameters are broadcast at construction (as DDP does), so workers never start
apart; the reduction is always bucketed; a worker with a non-finite
pseudo-gradient is left out of the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.distributed.buckets import QUANTIZERS
from mergelab.distributed.comm import Comm, TorchComm
from mergelab.distributed.flat import flat_sgd_begin, flat_sgd_end, flat_sgd_range, flat_sgd_supported, flat_views
from mergelab.distributed.outer import FragmentReducer, OuterMerge
from mergelab.distributed.validate import broadcast_parameters, check_same_model


def current_comm() -> Comm | None:
    """The simulated group of this thread (set by simulate_workers), if any."""
    from mergelab.distributed.simulate import thread_comm

    return thread_comm()


class DiLoCo:
    """Sync a model's parameters among workers every `sync_every` inner steps (see module doc).

    Args:
        model: the worker's model; every worker's must have the same parameter names and shapes.
        inner: the optimizer the training loop steps; its step hooks drive the syncs.
        outer: optimizer over the same model's parameters, stepped with the pseudo-gradient
            (or one per fragment).
        sync_every: H, inner steps between syncs of a fragment (>= 1).
        outer_merge: "mean" or a mergelab method name (`mergelab.methods()`).
        merge_params: that method's parameters, e.g. {"density": 0.2}.
        model_fragments: Streaming DiLoCo's fragments (modules of `model`, or lists of its
            parameters, covering each parameter once); None: the whole model is one fragment.
        fragment_sync_delay: tau, inner steps a fragment's reduction overlaps before it is applied.
        fragment_update_alpha: weight of the worker's local parameters when a fragment is applied.
        quantize: "none", "bf16", "fp8" or "int4": the pseudo-gradients' wire format.
        backup_device: where the global parameters are kept (default: beside each parameter).
        group: torch.distributed process group (default: the world).
        bucket_cap_mb: size of the flat buffers the pseudo-gradients travel in.
        stats_fn: for merge methods that need statistics, returns one metric tensor per
            parameter of the model (default for optimizer_aware/preconditioned: the inner
            optimizer's own metric, e.g. Adam's sqrt(v_hat) + eps).
        seed: seed of randomised merge methods (combined with the sync and tensor name).
        checkpoint_dir, checkpoint_every: save global parameters and outer state as
            checkpoint-<sync>/ every K syncs (rank 0 writes; see checkpoint.py).
        comm: a Comm to use instead of `group` (simulate_workers sets one per thread).
        manager: a torchft Manager: fault-tolerant syncs among the live replicas (see
            fault_tolerance.py); mean only, no quantization.
    """

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer,
                 outer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                 sync_every: int, *, outer_merge: str = "mean", merge_params: Mapping[str, Any] | None = None,
                 model_fragments: Sequence[nn.Module | Sequence[Tensor]] | None = None, fragment_sync_delay: int = 0,
                 fragment_update_alpha: float = 0.0, quantize: str = "none",
                 backup_device: str | torch.device | None = None, group=None, bucket_cap_mb: float = 25,
                 stats_fn: Callable[[], Sequence[Tensor]] | None = None, seed: int = 0,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
                 comm: Comm | None = None, manager=None):
        fragments = list(model_fragments) if model_fragments else [model]
        _check_schedule(sync_every, len(fragments), fragment_sync_delay, fragment_update_alpha, quantize,
                        bucket_cap_mb, checkpoint_every)
        outers = list(outer) if isinstance(outer, (list, tuple)) else [outer] * len(fragments)
        if len(outers) != len(fragments):
            raise ValueError(f"{len(outers)} outer optimizers for {len(fragments)} fragments; pass one, "
                             "or one per fragment")
        self.model, self.inner, self.outers = model, inner, outers
        self.outer = outers[0]
        self.merge = OuterMerge(outer_merge, dict(merge_params or {}), seed)
        self.manager = manager
        if manager is not None:
            from mergelab.distributed.fault_tolerance import TorchFTComm

            if outer_merge != "mean" or quantize != "none":
                raise ValueError("with a torchft manager only outer_merge='mean' and quantize='none' are "
                                 f"supported (it all-reduces, never all-gathers); got {outer_merge!r}, {quantize!r}")
            self.comm = TorchFTComm(manager)  # torchft heals replicas that start apart (init_sync)
        else:
            self.comm = comm or current_comm() or TorchComm(group)
            self.merge.check(self.comm.world_size)
            check_same_model(self.comm, model)
            broadcast_parameters(self.comm, model)
        names = {id(p): n for n, p in model.named_parameters()}
        self.fragments = _fragment_params(fragments, names)
        self.per = sync_every // len(fragments)
        self.delay, self.alpha, self.quant = fragment_sync_delay, fragment_update_alpha, quantize
        cap = int(bucket_cap_mb * 2**20)
        self.reducers = [FragmentReducer(self.comm, [n for n, _ in frag], [p for _, p in frag], self.merge,
                                         quantize=quantize, bucket_cap_bytes=cap) for frag in self.fragments]
        self.backup_flat: list[Tensor | None] = []  # theta of each fragment as one flat buffer, where it can be
        self.backup: list[list[Tensor]] = []  # per tensor: views of backup_flat[k], or tensors of their own
        for frag in self.fragments:
            flat, views = _backup_for([p for _, p in frag], backup_device)
            self.backup_flat.append(flat)
            self.backup.append(views)
        self._momentum: dict[int, tuple[Tensor, list[Tensor]]] = {}  # flat SGD momentum of fragment k
        self.stats_fn = stats_fn
        self.flat_outer_step = True  # False: always step through outer.step() (for comparisons)
        self._sync_entry = -1  # this sync's entry in stats.per_sync
        self.local_step = 0
        self.syncs = 0  # fragment syncs applied (torchft's manager step)
        self.skipped = 0  # syncs where no worker had a finite pseudo-gradient
        self.discarded = 0  # syncs torchft did not commit (a replica failed during the sync)
        self.healed = 0  # times this replica was healed from a peer (torchft)
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self._hooks: list = []
        self._t_enter: float | None = None
        self.wall_seconds = 0.0
        self._comm_inside = 0.0  # communication seconds while inside the context (not the setup's)
        self._comm_at_enter = 0.0
        self._save_global(range(len(self.fragments)))
        if manager is not None:
            from mergelab.distributed.fault_tolerance import register_state

            register_state(self, manager)

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> DiLoCo:
        self._hooks.append(self.inner.register_step_post_hook(lambda *_: self.after_inner_step()))
        self._t_enter = time.perf_counter()
        self._comm_at_enter = self.comm.stats.comm_seconds - self._comm_inside
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._t_enter is not None:
            self._comm_inside = self.comm.stats.comm_seconds - self._comm_at_enter
            self.wall_seconds += time.perf_counter() - self._t_enter
            self._t_enter = None
        return False

    @property
    def stats(self):
        """CommStats of this worker (bytes, calls, seconds in communication)."""
        return self.comm.stats

    def report(self) -> dict[str, Any]:
        """Bytes sent and time split: communication vs the rest (compute)."""
        wall = self.wall_seconds + (time.perf_counter() - self._t_enter if self._t_enter else 0.0)
        d = self.comm.stats.as_dict()
        d["comm_seconds"] = (self.comm.stats.comm_seconds - self._comm_at_enter if self._t_enter
                             else self._comm_inside)
        d.update(wall_seconds=wall, compute_seconds=wall - d["comm_seconds"], syncs=self.syncs,
                 skipped_syncs=self.skipped, discarded_syncs=self.discarded, healed=self.healed,
                 world_size=self.comm.world_size)
        return d

    # -- the schedule --------------------------------------------------------------------
    def current_fragment(self) -> int:
        return self.syncs % len(self.fragments)

    def after_inner_step(self) -> None:
        self.local_step += 1
        if self.local_step == self.per - self.delay:
            self._prepare(self.current_fragment())
        if self.local_step == self.per:
            self._perform(self.current_fragment())
            self.local_step = 0

    @torch.no_grad()
    def _prepare(self, k: int) -> None:
        if self.manager is not None:
            self.comm.begin_sync()  # quorum of the live replicas; may heal this one from a peer
            k = self.current_fragment()
        frag = self.fragments[k]
        stats = self._stats(k) if self.merge.gathers and self._needs_stats() else None
        before = self.comm.stats.payload_bytes, self.comm.stats.wire_bytes
        # with no overlap (tau = 0) nothing changes the parameters before _perform, so each bucket's
        # reduction may start as soon as it is written (see FragmentReducer.start)
        self.reducers[k].start(self.backup[k], [p for _, p in frag], stats, step=self.syncs,
                               optimistic=self.delay == 0 and self.manager is None)
        self.comm.stats.per_sync.append((self.comm.stats.payload_bytes - before[0],
                                         self.comm.stats.wire_bytes - before[1]))
        self._sync_entry = len(self.comm.stats.per_sync) - 1

    @torch.no_grad()
    def _perform(self, k: int) -> None:
        frag = self.fragments[k]
        params = [p for _, p in frag]
        hyper = self._flat_step_hyper(k)
        reducer = self.reducers[k]
        stats, before = self.comm.stats, (self.comm.stats.payload_bytes, self.comm.stats.wire_bytes)
        merged = reducer.finish_plain() if hyper is not None else reducer.finish()
        if stats.payload_bytes != before[0]:  # a second reduction (a worker was not finite): this sync's bytes
            pay, wire = stats.per_sync[self._sync_entry]
            stats.per_sync[self._sync_entry] = (pay + stats.payload_bytes - before[0], wire + stats.wire_bytes - before[1])
        if self.manager is not None and not self.comm.should_commit():
            self.discarded += 1  # a replica failed mid-sync: every replica drops this step
            _copy_all(params, self.backup[k])
            return
        if hyper is not None and merged is not None:
            # the outer SGD step on the flat buffers, writing the new theta into the model in the same pass
            # bucket by bucket, each as soon as its all-reduce is done (the next ones still running)
            mom, mom_views = self._momentum_buffers(k, hyper)
            first = flat_sgd_begin(self.outers[k], hyper, params, mom_views)
            theta, offset = self.backup_flat[k], 0
            for idx, summed in merged:
                n = summed.numel()
                flat_sgd_range(hyper, [params[i] for i in idx], theta[offset:offset + n], summed, reducer.count,
                               mom[offset:offset + n] if mom.numel() else mom, first,
                               write_params=self.alpha == 0)
                offset += n
            flat_sgd_end(self.outers[k], hyper, params, mom_views)
            if self.alpha > 0:  # p <- lerp(theta, p, alpha), as the generic path below computes it
                for p, b in zip(params, self.backup[k]):
                    torch.lerp(b, p, self.alpha, out=p.data)
            for p in params:
                p.grad = None  # as outer.zero_grad() leaves them on the generic path
        else:
            local = [p.detach().clone() for p in params] if self.alpha > 0 else None
            _copy_all(params, self.backup[k])
            if merged is None:  # every worker was non-finite: keep theta as it was
                self.skipped += 1
            else:
                self._outer_step(self.outers[k], frag, merged)
                self._save_global([k])
                if local is not None:
                    for p, loc in zip(params, local):
                        p.lerp_(loc, self.alpha)
        self.syncs = self.comm.current_step() if self.manager is not None else self.syncs + 1
        if self.checkpoint_dir is not None and self.checkpoint_every and self.syncs % self.checkpoint_every == 0:
            self.save_checkpoint(self.checkpoint_dir)

    def _outer_step(self, outer: torch.optim.Optimizer, frag, merged: list[Tensor]) -> None:
        in_frag = {id(p) for _, p in frag}
        stash = {}
        for group in outer.param_groups:  # a single outer optimizer must step this fragment only
            for p in group["params"]:
                if id(p) not in in_frag:
                    stash[p], p.grad = p.grad, None
        for (_, p), g in zip(frag, merged):
            p.grad = g.to(p.device, p.dtype)
        with torch.enable_grad():
            outer.step()
        outer.zero_grad()
        for p, g in stash.items():
            p.grad = g

    def _flat_step_hyper(self, k: int) -> dict | None:
        """SGD's hyperparameters when fragment k's outer step can run on its flat buffers (flat.py):
        plain mean, no torchft, theta and the reduced pseudo-gradient flat buffers of the parameters'
        own dtype and device, and an outer optimizer flat_sgd_step reproduces exactly."""
        flat, grad = self.backup_flat[k], self.reducers[k].flat
        if self.manager is not None or flat is None or grad is None or flat.dtype != grad.dtype \
                or flat.device != grad.device or not self.flat_outer_step:
            return None
        params = [p for _, p in self.fragments[k]]
        hyper = flat_sgd_supported(self.outers[k], params)
        if hyper is None or hyper["momentum"] == 0:
            return hyper
        state = self.outers[k].state
        have = [p in state and state[p].get("momentum_buffer") is not None for p in params]
        return hyper if all(have) or not any(have) else None

    def _momentum_buffers(self, k: int, hyper: dict) -> tuple[Tensor, list[Tensor]]:
        if hyper["momentum"] == 0:
            return self.backup_flat[k].new_empty(0), []
        if k not in self._momentum:
            self._momentum[k] = flat_views(self.backup[k])
        return self._momentum[k]

    def _save_global(self, ks) -> None:
        with torch.no_grad():
            for k in ks:
                for (_, p), b in zip(self.fragments[k], self.backup[k]):
                    b.copy_(p.detach(), non_blocking=True)

    def _needs_stats(self) -> bool:
        from mergelab.methods import REGISTRY

        return bool(REGISTRY[self.merge.method].needs_stats)

    def _stats(self, k: int) -> list[Tensor]:
        if self.stats_fn is not None:
            all_stats = list(self.stats_fn())
            pos = {id(p): i for i, (_, p) in enumerate(self.model.named_parameters())}
            return [all_stats[pos[id(p)]] for _, p in self.fragments[k]]
        return [inner_metric(self.inner, p) for _, p in self.fragments[k]]

    # -- checkpoints ------------------------------------------------------------------------
    def global_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict with every parameter replaced by its global value."""
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        for frag, backups in zip(self.fragments, self.backup):
            for (_, p), b in zip(frag, backups):
                sd[by_id[id(p)]] = b.detach().to("cpu").clone()
        return sd

    def save_checkpoint(self, run_dir: str | Path) -> Path | None:
        """Rank 0 writes checkpoint-<syncs>/ (model.safetensors + optimizer.pt) atomically."""
        from mergelab.distributed.checkpoint import save_global

        if self.comm.rank != 0:
            return None
        return save_global(run_dir, self.syncs, self.global_state_dict(), self._outer_state(),
                           {"syncs": self.syncs, "skipped": self.skipped, "world_size": self.comm.world_size})

    def _distinct_outers(self) -> list[torch.optim.Optimizer]:
        out: list[torch.optim.Optimizer] = []
        for o in self.outers:
            if not any(o is q for q in out):
                out.append(o)
        return out

    def _outer_state(self) -> dict:
        outers = self._distinct_outers()
        return outers[0].state_dict() if len(outers) == 1 else {"per_fragment": [o.state_dict() for o in outers]}

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a checkpoint-<step>/ folder: global parameters, outer state, sync count."""
        from mergelab.distributed.checkpoint import load_global

        sd, outer_state, meta = load_global(path, self.model)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(sd[name])
        if len(self._distinct_outers()) == 1:
            self.outer.load_state_dict(outer_state)
        else:
            for o, st in zip(self._distinct_outers(), outer_state["per_fragment"]):
                o.load_state_dict(st)
        self.syncs, self.skipped, self.local_step = int(meta["syncs"]), int(meta.get("skipped", 0)), 0
        self._save_global(range(len(self.fragments)))


def inner_metric(optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor:
    """The inner optimizer's diagonal metric of parameter p (Adam: sqrt(v_hat) + eps; SGD: 1)."""
    from mergelab.stats.optimizer_state import detect_kind, metric_from_state

    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            state = optimizer.state.get(p, {})
            kind = detect_kind({"state": {0: state}}) if state else "sgd"
            return metric_from_state(kind, state, group, shape=tuple(p.shape)).to(p.device)
    raise ValueError("a parameter of the model is not in the inner optimizer; give the inner "
                     "optimizer every parameter of the model")


def _backup_for(params: Sequence[Tensor], device) -> tuple[Tensor | None, list[Tensor]]:
    """Storage for a fragment's global parameters: one flat buffer and views of it when the parameters
    share dtype and device (else a tensor each); pinned CPU memory for a GPU model backed up on the CPU."""
    devs = [torch.device(device) if device is not None else p.device for p in params]
    pins = [d.type == "cpu" and p.device.type == "cuda" for d, p in zip(devs, params)]
    if len({p.dtype for p in params}) == 1 and len(set(devs)) == 1 and len(set(pins)) == 1:
        return flat_views(params, device=devs[0], pin=pins[0])
    out = []
    for p, d, pin in zip(params, devs, pins):
        t = torch.empty(p.shape, dtype=p.dtype, device=d)
        out.append(t.pin_memory() if pin else t)
    return None, out


def _copy_all(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """dst[i] <- src[i] for every i, in one call."""
    torch._foreach_copy_([t.data for t in dst], list(src))


def _fragment_params(fragments: Sequence[Any], names: Mapping[int, str]) -> list[list[tuple[str, Tensor]]]:
    out, seen = [], {}
    for k, frag in enumerate(fragments):
        params = []
        for p in (frag.parameters() if isinstance(frag, nn.Module) else frag):
            if id(p) not in names:
                raise ValueError(f"model_fragments[{k}] holds a parameter that is not in the model")
            if id(p) in seen:
                raise ValueError(f"parameter {names[id(p)]} is in model_fragments[{seen[id(p)]}] and [{k}]; "
                                 "every parameter belongs to one fragment")
            seen[id(p)] = k
            params.append((names[id(p)], p))
        if not params:
            raise ValueError(f"model_fragments[{k}] has no parameters")
        out.append(params)
    missing = [n for i, n in names.items() if i not in seen]
    if missing:
        raise ValueError(f"parameter {missing[0]} is in no fragment; the fragments must cover the model")
    return out


def _check_schedule(sync_every, n_frag, delay, alpha, quantize, bucket_cap_mb, checkpoint_every) -> None:
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    if sync_every % n_frag or sync_every < n_frag:
        raise ValueError(f"sync_every ({sync_every}) must be a multiple of the number of fragments ({n_frag})")
    if not isinstance(delay, int) or not 0 <= delay < sync_every // n_frag:
        raise ValueError(f"fragment_sync_delay must be an integer in [0, sync_every / fragments = "
                         f"{sync_every // n_frag}), got {delay!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fragment_update_alpha must be in [0, 1], got {alpha!r}")
    if quantize not in QUANTIZERS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZERS)}, got {quantize!r}")
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
