"""One torchft replica group (one process) training a tiny model with mergelab's DiLoCo.

    python ft_worker.py REPLICA_ID LIGHTHOUSE_ADDR OUT_DIR SYNCS

Trains until SYNCS syncs, or the number in OUT_DIR/target.txt once that exists
(the test sets it when the restarted replica has rejoined). Writes OUT_DIR/progress-<id>.txt (the sync count after each step) and, when
done, OUT_DIR/final-<id>.pt (parameters, global parameters, report, the sync
count seen right after its first quorum).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch


def _target(out: Path, default: int) -> int:
    try:
        return int((out / "target.txt").read_text())
    except (FileNotFoundError, ValueError):
        return default


def main(replica: int, lighthouse: str, out: Path, syncs: int) -> None:
    import torch.distributed as dist
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    import dist_scenarios as sc
    from mergelab.distributed import DiLoCo

    torch.set_num_threads(1)
    m = sc.mlp()
    X, y = sc.mlp_data(replica)
    inner = torch.optim.SGD(m.parameters(), lr=0.05)
    outer = torch.optim.SGD(m.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=10)), min_replica_size=2,
                      load_state_dict=lambda sd: m.load_state_dict(sd["model"]),
                      state_dict=lambda: {"model": m.state_dict()}, replica_id=f"replica{replica}",
                      store_addr="localhost", store_port=store.port, rank=0, world_size=1,
                      lighthouse_addr=lighthouse, port=sc.free_port(), timeout=timedelta(seconds=10),
                      quorum_timeout=timedelta(seconds=60), use_async_quorum=False, init_sync=False)
    first_seen = None
    progress = out / f"progress-{replica}.txt"
    try:
        with DiLoCo(m, inner, outer, sync_every=2, manager=manager) as d:
            while d.syncs < _target(out, syncs):
                inner.zero_grad()
                ((m(X) - y) ** 2).mean().backward()
                inner.step()
                if first_seen is None and d.local_step == 0:
                    first_seen = d.syncs  # after the first quorum: 1 for a fresh start, more if healed
                progress.write_text(str(d.syncs))
                time.sleep(0.05)  # a step of "compute", so that a kill lands mid-run
        torch.save({"params": [p.detach().clone() for p in m.parameters()], "global": d.global_state_dict(),
                    "report": d.report(), "first_seen": first_seen,
                    "outer": outer.state_dict()}, out / f"final-{replica}.pt")
    finally:
        manager.shutdown(wait=False)


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a stuck replica is
    sys.path.insert(0, str(Path(__file__).parent))
    main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
