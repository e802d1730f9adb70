"""Merging inside training: LocalSGD, DiLoCo, FedAvg, Streaming DiLoCo and SPARTA on torch.distributed.

    from mergelab.distributed import DiLoCo
    with DiLoCo(model, inner, outer, sync_every=500):        # outer_merge="mean"
        for batch in loader:
            inner.zero_grad(); loss(model, batch).backward(); inner.step()

The outer step may be any mergelab method (`outer_merge="ties"`,
`merge_params={"density": 0.3}`); `simulate_workers(n, fn)` runs n workers in
one process with the same numbers.
"""

from mergelab.distributed.checkpoint import latest_checkpoint
from mergelab.distributed.comm import CommStats
from mergelab.distributed.config import DiLoCoConfig
from mergelab.distributed.diloco import DiLoCo
from mergelab.distributed.local_sgd import LocalSGD
from mergelab.distributed.outer import WorkerLeftOut
from mergelab.distributed.simulate import simulate_workers
from mergelab.distributed.sparta import SPARTA
from mergelab.distributed.validate import WorkerMismatch

__all__ = ["DiLoCo", "DiLoCoConfig", "LocalSGD", "SPARTA", "simulate_workers", "latest_checkpoint", "CommStats", "WorkerLeftOut",
           "WorkerMismatch"]
