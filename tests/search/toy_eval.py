"""Evaluators of the search tests: functions of a state dict holding one 2-vector `w`."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _w(state):
    w = state["w"].double()
    return float(w[0]), float(w[1])


def quadratic(state):
    """A convex bowl with its minimum at (0.3, 0.7)."""
    x, y = _w(state)
    return {"loss": (x - 0.3) ** 2 + 2 * (y - 0.7) ** 2}


def coords(state):
    """Both coordinates as metrics (each maximised by name: they contain 'score')."""
    x, y = _w(state)
    return {"x_score": x, "y_score": y}


def neg_dist(state):
    """Closeness to the origin."""
    x, y = _w(state)
    return {"score": -(x * x + y * y)}


def flaky(state):
    """The quadratic, except that it fails right of x = 0.8."""
    x, _ = _w(state)
    if x > 0.8:
        raise RuntimeError("evaluation crashed")
    return quadratic(state)


def rendezvous(state):
    """The quadratic, slowed down; each process's first call waits (300 s at most) until two processes
    have made one, so that both take part in a shared study (folder: $MERGELAB_TEST_RENDEZVOUS)."""
    folder = Path(os.environ["MERGELAB_TEST_RENDEZVOUS"])
    mark = folder / str(os.getpid())
    if not mark.exists():
        mark.touch()
        deadline = time.monotonic() + 300
        while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(0.1)
    return quadratic(state)
