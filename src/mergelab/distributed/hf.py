"""DiLoCo for a Hugging Face Trainer under torchrun.

    from mergelab.distributed.hf import use_diloco
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=ds)
    use_diloco(trainer, sync_every=500, outer_lr=0.7, outer_momentum=0.9)
    trainer.train()

    torchrun --nproc-per-node 4 train.py        # or --nnodes N --rdzv-endpoint HOST:PORT

Under torchrun the Trainer wraps the model in DistributedDataParallel, which
all-reduces gradients every step. The callback turns that off (a DDP
communication hook that keeps each worker's own gradient, so no gradient
crosses the network) and drives DiLoCo from the Trainer's optimizer instead:
every worker trains on its own shard of the data (the Trainer's distributed
sampler) and the workers meet every `sync_every` optimizer steps. Without
torch.distributed initialised (a single process) it does nothing.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # transformers is an optional dependency
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]


def _local_gradients(_state, bucket):
    """DDP communication hook that communicates nothing: each worker keeps its own gradient."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class DiLoCoCallback(TrainerCallback):
    """Runs DiLoCo inside `Trainer.train()`; build it with `use_diloco(trainer, ...)`.

    Args:
        trainer: the Trainer (its DDP wrapper is reached through it at train start).
        sync_every: H, optimizer steps between syncs.
        outer_lr, outer_momentum, nesterov: the outer SGD (DiLoCo: 0.7, 0.9, True; FedAvg: 1.0, 0, False).
        **diloco: other DiLoCo arguments (outer_merge, merge_params, quantize, checkpoint_dir, ...).
    """

    def __init__(self, trainer, sync_every: int, *, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, **diloco: Any):
        self.trainer, self.sync_every = trainer, sync_every
        self.outer_kw = dict(lr=outer_lr, momentum=outer_momentum, nesterov=nesterov and outer_momentum > 0)
        self.diloco_kw = diloco
        self.diloco = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch.distributed as dist

        from mergelab.distributed.diloco import DiLoCo

        if not (dist.is_available() and dist.is_initialized()):
            return control
        wrapped = getattr(self.trainer, "model_wrapped", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(None, _local_gradients)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the torch optimizer
        outer = torch.optim.SGD(model.parameters(), **self.outer_kw)
        self.diloco = DiLoCo(model, inner, outer, self.sync_every, **self.diloco_kw)
        self.diloco.__enter__()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.diloco is not None:
            self.diloco.__exit__(None, None, None)
        return control


def use_diloco(trainer, sync_every: int, **kwargs: Any) -> DiLoCoCallback:
    """Add a DiLoCoCallback to `trainer` and return it (its `.diloco.report()` after training)."""
    cb = DiLoCoCallback(trainer, sync_every, **kwargs)
    trainer.add_callback(cb)
    return cb
