"""Crash recovery: leave out unstable checkpoints, average the last stable ones.

A checkpoint is unstable when any of its weights is NaN/Inf, or, when the
run's trainer_state.json log history is available, when it was saved at or
after a loss spike: a logged training loss above `spike_factor` times the
median of the preceding `window` logged losses (or a non-finite loss). Once a
spike is seen, later checkpoints are treated as unstable too, since the
weights that follow a spike descend from it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import CheckpointError
from mergelab.jsonfile import read_json_file
from mergelab.trajectory.discovery import RunCheckpoint


def loss_history(run_dir: Path, checkpoints: Sequence[RunCheckpoint]) -> list[tuple[int, float]]:
    """(step, loss) pairs from the newest trainer_state.json found (run folder or inside a checkpoint)."""
    candidates = [run_dir / "trainer_state.json"] + [c.path / "trainer_state.json" for c in reversed(checkpoints)
                                                     if c.path.is_dir()]
    for f in candidates:
        if f.is_file():
            return _history_of(read_json_file(f, "trainer state", advice="it should be the file transformers' Trainer wrote; fix or remove it"), f)
    return []


def _history_of(state: object, path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a trainer_state.json's log_history, checked entry by entry."""
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise CheckpointError(f"{path}: is not a Trainer state (a JSON object with a log_history list); "
                              "fix or remove it")
    out = []
    for i, e in enumerate(history):
        if not isinstance(e, dict) or "loss" not in e or "step" not in e:
            continue
        try:
            out.append((int(e["step"]), float(e["loss"])))
        except (TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{path}: log_history[{i}] has step {e['step']!r} and loss {e['loss']!r}, "
                                  "not numbers; fix or remove the file") from None
    return out


def first_spike(history: Sequence[tuple[int, float]], *, spike_factor: float = 3.0, window: int = 10) -> int | None:
    """Step of the first loss spike in a (step, loss) history, or None."""
    for i, (step, loss) in enumerate(history):
        if loss != loss or loss in (float("inf"), float("-inf")):
            return step
        past = [v for _, v in history[max(0, i - window):i]]
        if len(past) >= 3 and loss > spike_factor * statistics.median(past):
            return step
    return None


def stable_checkpoints(run_dir: Path, checkpoints: Sequence[RunCheckpoint], *, spike_factor: float = 3.0,
                       window: int = 10) -> tuple[list[RunCheckpoint], list[tuple[RunCheckpoint, str]]]:
    """Split checkpoints into (stable, [(unstable, why)])."""
    spike = first_spike(loss_history(Path(run_dir), checkpoints), spike_factor=spike_factor, window=window)
    stable, skipped = [], []
    for c in checkpoints:
        if spike is not None and c.step >= spike:
            skipped.append((c, f"saved at or after the loss spike at step {spike}"))
            continue
        with Checkpoint(c.path) as ck:
            bad = _first_nonfinite(ck)
        if bad is not None:
            skipped.append((c, f"tensor {bad} holds NaN/Inf"))
            continue
        stable.append(c)
    return stable, skipped


def _first_nonfinite(ck: Checkpoint) -> str | None:
    from mergelab.trajectory.average import nonfinite

    return nonfinite(ck)


RESUME_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state.pth")


def resume_files(newest_stable: RunCheckpoint) -> dict[str, Path]:
    """The optimizer/scheduler/trainer state files of the newest stable checkpoint (name -> path)."""
    if not newest_stable.path.is_dir():
        return {}
    return {name: newest_stable.path / name for name in RESUME_FILES if (newest_stable.path / name).is_file()}
