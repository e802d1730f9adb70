"""Crash recovery: leave out unstable checkpoints, average the last stable ones.

A checkpoint is unstable when any of its weights is NaN/Inf (found while
averaging, in the one pass over the weights: trajectory.run), or, when the
run's trainer_state.json log history is available, when it was saved at or
after a loss spike (decided here, before any weight is read): a logged
training loss above `spike_factor` times the median of the preceding
`window` logged losses (or a non-finite loss). Once a spike is seen, later
checkpoints are treated as unstable too, since the weights that follow a
spike descend from it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

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


def before_spike(run_dir: Path, checkpoints: Sequence[RunCheckpoint], *, spike_factor: float = 3.0,
                 window: int = 10) -> tuple[list[RunCheckpoint], list[tuple[RunCheckpoint, str]]]:
    """Split checkpoints into (kept, [(left out, why)]) by the loss history alone: no weights are read.

    Checkpoints holding NaN/Inf are found by the average's own pass over the
    weights (average.PassObserver), which reads each checkpoint once.
    """
    spike = first_spike(loss_history(Path(run_dir), checkpoints), spike_factor=spike_factor, window=window)
    if spike is None:
        return list(checkpoints), []
    kept = [c for c in checkpoints if c.step < spike]
    return kept, [(c, f"saved at or after the loss spike at step {spike}") for c in checkpoints if c.step >= spike]


RESUME_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state.pth")


def resume_files(newest_stable: RunCheckpoint) -> dict[str, Path]:
    """The optimizer/scheduler/trainer state files of the newest stable checkpoint (name -> path)."""
    if not newest_stable.path.is_dir():
        return {}
    return {name: newest_stable.path / name for name in RESUME_FILES if (newest_stable.path / name).is_file()}
