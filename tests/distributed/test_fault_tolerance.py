"""Fault tolerance with torchft: 3 replicas, one SIGKILLed mid-run; the others go on; the restarted one
heals from a peer and finishes with the same global model and outer state.

Every wait polls the replicas' progress files under one overall deadline (generous for a loaded
2-core machine; about 20 s on a quiet one); the replicas run in their own process sessions and are
killed as groups, and the lighthouse shut down, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
SYNCS = 10_000  # until the test writes target.txt
DEADLINE_S = 420  # the whole test, start-ups included: a bound, not an expectation


def _progress(out: Path, r: int) -> int:
    try:
        return int((out / f"progress-{r}.txt").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _wait(cond, deadline, what, procs=()):
    """Poll cond() until it holds; fail at the deadline, or at once when a replica that should be
    running has exited."""
    while not cond():
        dead = [r for r, p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"{what}: replica(s) {dead} exited early")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {DEADLINE_S} s")
        time.sleep(0.1)


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its own session), then reap it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


def test_killed_replica_does_not_stop_the_others_and_rejoins(tmp_path):
    from torchft.coordination import LighthouseServer

    deadline = time.monotonic() + DEADLINE_S
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=200, heartbeat_timeout_ms=2000)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    procs: dict[int, subprocess.Popen] = {}
    started: list[subprocess.Popen] = []
    logs: dict[int, Path] = {}

    def start(r):
        logs[r] = tmp_path / f"log-{r}-{len(started)}.txt"
        with open(logs[r], "w") as log:
            procs[r] = subprocess.Popen([sys.executable, str(HERE / "ft_worker.py"), str(r), lighthouse.address(),
                                         str(tmp_path), str(SYNCS)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        started.append(procs[r])

    def tails():
        return "\n".join(f"--- replica {r} ({path.name}):\n" + path.read_text()[-2000:] for r, path in logs.items())

    try:
        for r in range(3):
            start(r)
        running = lambda *rs: [(r, procs[r]) for r in rs]  # noqa: E731
        _wait(lambda: min(_progress(tmp_path, r) for r in range(3)) >= 3, deadline,
              "the replicas did not start syncing", running(0, 1, 2))
        _kill_group(procs[2])
        assert procs[2].returncode == -signal.SIGKILL
        at_kill = max(_progress(tmp_path, r) for r in (0, 1))
        # the survivors go on without it
        _wait(lambda: min(_progress(tmp_path, r) for r in (0, 1)) >= at_kill + 3, deadline,
              "the surviving replicas stopped after the kill", running(0, 1))
        (tmp_path / "progress-2.txt").unlink()
        start(2)
        _wait(lambda: _progress(tmp_path, 2) > 0, deadline, "the restarted replica did not rejoin", running(0, 1, 2))
        target = max(_progress(tmp_path, r) for r in range(3)) + 4
        (tmp_path / "target.txt").write_text(str(target))
        _wait(lambda: all(procs[r].poll() is not None for r in range(3)), deadline, "the replicas did not finish")
        assert [procs[r].returncode for r in range(3)] == [0, 0, 0], tails()
    except BaseException as e:
        if not isinstance(e, AssertionError):
            e.add_note(tails())
        raise
    finally:
        for p in started:
            _kill_group(p)
        lighthouse.shutdown()
    final = [torch.load(tmp_path / f"final-{r}.pt", weights_only=False) for r in range(3)]
    assert final[2]["first_seen"] > 1  # healed: it started from the others' sync count, not from 0
    assert final[2]["report"]["healed"] >= 1
    for r in (1, 2):
        for k, v in final[0]["global"].items():
            torch.testing.assert_close(final[r]["global"][k], v, atol=1e-12, rtol=0)
        assert final[r]["outer"]["state"][0]["momentum_buffer"].equal(final[0]["outer"]["state"][0]["momentum_buffer"])
    assert all(f["report"]["syncs"] == target for f in final)
