"""DiLoCo, FedAvg and Streaming DiLoCo: LocalSGD's schedule (local_sgd.py) with an outer-optimizer sync.

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
Structure, as torchft's DiLoCo(LocalSGD): the settings are one DiLoCoConfig (config.py), the
schedule (hooks, fragments' turns, timing) is LocalSGD's, and DiLoCo overrides its two sync
methods (prepare_sync: start the pseudo-gradients' reduction; perform_sync: the outer step,
outer_step.py). Differences: the workers' models are checked to be alike and rank 0's initial
parameters are broadcast at construction (as DDP does), so workers never start
apart; the reduction is always bucketed; a worker with a non-finite
pseudo-gradient is left out of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.distributed.comm import Comm, TorchComm
from mergelab.distributed.config import DiLoCoConfig
from mergelab.distributed.flat import flat_views
from mergelab.distributed.local_sgd import LocalSGD, current_comm
from mergelab.distributed.outer import FragmentReducer, OuterMerge
from mergelab.distributed.outer_step import copy_all, flat_step_hyper, outer_step, run_flat_step

__all__ = ["DiLoCo", "DiLoCoConfig", "current_comm", "inner_metric"]


class DiLoCo(LocalSGD):
    """Sync a model's parameters among workers every `sync_every` inner steps (see module doc).

    Args:
        model: the worker's model; every worker's must have the same parameter names and shapes.
        inner: the optimizer the training loop steps; its step hooks drive the syncs.
        outer: optimizer over the same model's parameters, stepped with the pseudo-gradient
            (or one per fragment).
        sync_every and keyword options: the fields of DiLoCoConfig (sync_every, outer_merge,
            merge_params, fragment_sync_delay, fragment_update_alpha, quantize, backup_device,
            bucket_cap_mb, seed, checkpoint_dir, checkpoint_every); or config=DiLoCoConfig(...).
        model_fragments: Streaming DiLoCo's fragments (modules of `model`, or lists of its
            parameters, covering each parameter once); None: the whole model is one fragment.
        group: torch.distributed process group (default: the world).
        stats_fn: for merge methods that need statistics, returns one metric tensor per
            parameter of the model (default for optimizer_aware/preconditioned: the inner
            optimizer's own metric, e.g. Adam's sqrt(v_hat) + eps).
        comm: a Comm to use instead of `group` (simulate_workers sets one per thread).
        manager: a torchft Manager: fault-tolerant syncs among the live replicas (see
            fault_tolerance.py); mean only, no quantization.
    """

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer,
                 outer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                 sync_every: int | None = None, *, config: DiLoCoConfig | None = None,
                 model_fragments: Sequence[nn.Module | Sequence[Tensor]] | None = None, group=None,
                 stats_fn: Callable[[], Sequence[Tensor]] | None = None, comm: Comm | None = None,
                 manager=None, **options: Any):
        cfg = DiLoCoConfig.of(config, sync_every, options)
        n_frag = len(model_fragments) if model_fragments else 1
        cfg.steps_per_fragment(n_frag)
        outers = list(outer) if isinstance(outer, (list, tuple)) else [outer] * n_frag
        if len(outers) != n_frag:
            raise ValueError(f"{len(outers)} outer optimizers for {n_frag} fragments; pass one, "
                             "or one per fragment")
        self.outers, self.outer = outers, outers[0]
        self.merge = OuterMerge(cfg.outer_merge, dict(cfg.merge_params), cfg.seed)
        self.manager = manager
        if manager is not None:
            from mergelab.distributed.fault_tolerance import TorchFTComm

            if cfg.outer_merge != "mean" or cfg.quantize != "none":
                raise ValueError("with a torchft manager only outer_merge='mean' and quantize='none' are "
                                 f"supported (it all-reduces, never all-gathers); got {cfg.outer_merge!r}, "
                                 f"{cfg.quantize!r}")
            comm = TorchFTComm(manager)  # torchft heals replicas that start apart (init_sync)
        else:
            comm = comm or current_comm() or TorchComm(group)
        self._setup(model, inner, cfg, model_fragments, comm, connect=manager is None,
                    before_connect=None if manager is not None else lambda c: self.merge.check(c.world_size))
        self.alpha, self.quant = cfg.fragment_update_alpha, cfg.quantize
        cap = int(cfg.bucket_cap_mb * 2**20)
        self.reducers = [FragmentReducer(self.comm, [n for n, _ in frag], [p for _, p in frag], self.merge,
                                         quantize=cfg.quantize, bucket_cap_bytes=cap) for frag in self.fragments]
        self.backup_flat: list[Tensor | None] = []  # theta of each fragment as one flat buffer, where it can be
        self.backup: list[list[Tensor]] = []  # per tensor: views of backup_flat[k], or tensors of their own
        for frag in self.fragments:
            flat, views = _backup_for([p for _, p in frag], cfg.backup_device)
            self.backup_flat.append(flat)
            self.backup.append(views)
        self._momentum: dict[int, tuple[Tensor, list[Tensor]]] = {}  # flat SGD momentum of fragment k
        self.stats_fn = stats_fn
        self.flat_outer_step = True  # False: always step through outer.step() (for comparisons)
        self._sync_entry = -1  # this sync's entry in stats.per_sync
        self.skipped = 0  # syncs where no worker had a finite pseudo-gradient
        self.discarded = 0  # syncs torchft did not commit (a replica failed during the sync)
        self.healed = 0  # times this replica was healed from a peer (torchft)
        self.checkpoint_dir, self.checkpoint_every = cfg.checkpoint_dir, cfg.checkpoint_every
        self._save_global(range(len(self.fragments)))
        if manager is not None:
            from mergelab.distributed.fault_tolerance import register_state

            register_state(self, manager)

    def report(self) -> dict[str, Any]:
        """Bytes sent and time split: communication vs the rest (compute); syncs skipped, discarded, healed."""
        d = super().report()
        d.update(skipped_syncs=self.skipped, discarded_syncs=self.discarded, healed=self.healed)
        return d

    # -- the sync strategy ------------------------------------------------------------------
    @torch.no_grad()
    def prepare_sync(self, k: int) -> None:
        """Start fragment k's pseudo-gradient reduction (theta - theta_i, bucketed)."""
        if self.manager is not None:
            self.comm.begin_sync()  # quorum of the live replicas; may heal this one from a peer
            k = self.current_fragment()
        frag = self.fragments[k]
        stats = self._stats(k) if self.merge.gathers and self._needs_stats() else None
        before = self.comm.stats.payload_bytes, self.comm.stats.wire_bytes
        # with no overlap (tau = 0) nothing changes the parameters before perform_sync, so each bucket's
        # reduction may start as soon as it is written (see FragmentReducer.start)
        self.reducers[k].start(self.backup[k], [p for _, p in frag], stats, step=self.syncs,
                               optimistic=self.delay == 0 and self.manager is None)
        self.comm.stats.per_sync.append((self.comm.stats.payload_bytes - before[0],
                                         self.comm.stats.wire_bytes - before[1]))
        self._sync_entry = len(self.comm.stats.per_sync) - 1

    @torch.no_grad()
    def perform_sync(self, k: int) -> None:
        """The outer step of fragment k with the reduced pseudo-gradient (flat SGD where exact)."""
        frag = self.fragments[k]
        params = [p for _, p in frag]
        hyper = None
        if self.manager is None and self.flat_outer_step:
            hyper = flat_step_hyper(self.outers[k], params, self.backup_flat[k], self.reducers[k].flat)
        reducer = self.reducers[k]
        stats, before = self.comm.stats, (self.comm.stats.payload_bytes, self.comm.stats.wire_bytes)
        merged = reducer.finish_plain() if hyper is not None else reducer.finish()
        if stats.payload_bytes != before[0]:  # a second reduction (a worker was not finite): this sync's bytes
            pay, wire = stats.per_sync[self._sync_entry]
            stats.per_sync[self._sync_entry] = (pay + stats.payload_bytes - before[0], wire + stats.wire_bytes - before[1])
        if self.manager is not None and not self.comm.should_commit():
            self.discarded += 1  # a replica failed mid-sync: every replica drops this step
            copy_all(params, self.backup[k])
            return
        if hyper is not None and merged is not None:
            run_flat_step(self.outers[k], hyper, params, self.backup_flat[k], self.backup[k], merged,
                          reducer.count, self._momentum_buffers(k, hyper), self.alpha)
        elif merged is None:  # every worker was non-finite: keep theta as it was
            copy_all(params, self.backup[k])
            self.skipped += 1
        else:
            local = [p.detach().clone() for p in params] if self.alpha > 0 else None
            copy_all(params, self.backup[k])
            outer_step(self.outers[k], frag, merged)
            self._save_global([k])
            if local is not None:  # p <- lerp(theta, p_local, alpha)
                for p, loc in zip(params, local):
                    p.lerp_(loc, self.alpha)
        self.syncs = self.comm.current_step() if self.manager is not None else self.syncs + 1
        if self.checkpoint_dir is not None and self.checkpoint_every and self.syncs % self.checkpoint_every == 0:
            self.save_checkpoint(self.checkpoint_dir)

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
