"""Find the checkpoints of a training run and order them by step.

Recognised, inside RUN_DIR:
- Hugging Face Trainer folders `checkpoint-<step>/`;
- files or folders whose name carries the step: `step_1200.safetensors`,
  `model-step=500.pt`, `ckpt_000300/`, `epoch3-step900.bin`, `1000.pt`
  (the last integer in the name after a step/iter/ckpt marker, else the only
  integer in the name).
Steps are compared as integers, so checkpoint-1000 comes after checkpoint-900.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from mergelab.errors import CheckpointError, InvalidInput

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MARKED = re.compile(r"(?:checkpoint|step|iter|iteration|ckpt|global_step)[-_=]?0*(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"(\d+)")


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    step: int
    path: Path


def step_of(name: str) -> int | None:
    """The training step encoded in a file or folder name, or None."""
    stem = name
    for suffix in _WEIGHT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    marked = _MARKED.findall(stem)
    if marked:
        return int(marked[-1])
    numbers = _NUMBER.findall(stem)
    return int(numbers[0]) if len(numbers) == 1 else None


def _is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith(_WEIGHT_SUFFIXES) and not path.name.startswith(("optimizer", "scheduler", "rng"))
    if path.is_dir():
        return any(p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.startswith(("optimizer", "scheduler", "rng"))
                   for p in path.iterdir())
    return False


def discover(run_dir: str | Path, *, explicit: Sequence[str | Path] | None = None) -> list[RunCheckpoint]:
    """Checkpoints of a run, oldest first. `explicit` paths are used as given (ordered by their step if
    every name has one, else in the order given)."""
    if explicit:
        paths = [Path(p) for p in explicit]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise CheckpointError(f"checkpoint {missing[0]} does not exist")
        steps = [step_of(p.name) for p in paths]
        if all(s is not None for s in steps):
            return sorted((RunCheckpoint(s, p) for s, p in zip(steps, paths)), key=lambda c: c.step)
        return [RunCheckpoint(i, p) for i, p in enumerate(paths)]
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run folder {run} does not exist or is not a folder")
    found = []
    for child in run.iterdir():
        if child.name.startswith("."):
            continue
        step = step_of(child.name)
        if step is not None and _is_checkpoint(child):
            found.append(RunCheckpoint(step, child))
    if not found:
        raise CheckpointError(
            f"no checkpoints found in {run}: expected checkpoint-<step>/ folders or weight files with the "
            "step in their name (step_100.safetensors, ...); or pass the checkpoints explicitly")
    found.sort(key=lambda c: c.step)
    dupes = [a for a, b in zip(found, found[1:]) if a.step == b.step]
    if dupes:
        raise CheckpointError(f"two checkpoints in {run} claim step {dupes[0].step}: {dupes[0].path.name}; "
                              "pass the ones to use explicitly")
    return found


def select(checkpoints: list[RunCheckpoint], *, last: int | None = None, every: int = 1) -> list[RunCheckpoint]:
    """Keep every `every`-th checkpoint counting back from the newest, then the newest `last` of those."""
    if every < 1:
        raise InvalidInput(f"every must be at least 1, got {every}", option="every")
    picked = checkpoints[::-1][::every][::-1]
    if last is not None:
        if last < 1:
            raise InvalidInput(f"last must be at least 1, got {last}", option="last")
        if last > len(picked):
            raise InvalidInput(f"last={last} asks for more checkpoints than the run has ({len(picked)} taking every {every}-th); "
                             f"ask for {len(picked)} or fewer", option="last")
        picked = picked[-last:]
    return picked
