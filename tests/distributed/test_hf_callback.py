"""DiLoCo inside a real transformers Trainer, 2 processes under torchrun (gloo, CPU).

Bounded: torchrun and its workers run in their own process session, killed as a group at the
deadline or on failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import dist_scenarios as sc  # noqa: E402

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow
TIMEOUT_S = 360  # a bound, not an expectation: ~10 s on a quiet 2-core machine


def test_trainer_with_diloco_callback_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(sc.free_port()), str(HERE / "hf_worker.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = None
    finally:  # torchrun's workers too, whatever happened
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert rc == 0, f"torchrun {'timed out' if rc is None else f'exited {rc}'}:\n" + log.read_text()[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["ddp"] == "DistributedDataParallel"  # the Trainer did wrap the model; the hook silenced it
    # between syncs the workers train apart (steps 1, 2, 4, 5); after each sync (3, 6) they agree
    assert r0["digests"][0] != r1["digests"][0] and r0["digests"][3] != r1["digests"][3]
    assert r0["digests"][2] == pytest.approx(r1["digests"][2], abs=1e-9)
    for k, v in r0["params"].items():
        torch.testing.assert_close(r1["params"][k], v, atol=1e-7, rtol=0)
    n = sum(v.numel() for v in r0["params"].values())
    assert r0["report"]["syncs"] == 2
    assert r0["report"]["payload_bytes"] == 2 * (4 * n + 4 * 2)  # 2 syncs: float32 pseudo-gradients + 2 flags
