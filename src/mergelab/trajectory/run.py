"""`mergelab average` and `mergelab recover`: discovery, selection, weights, then one engine pass."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mergelab.checkpoint.writer import parse_size
from mergelab.checkpoint.output import check_output
from mergelab.errors import CheckpointError, InvalidInput
from mergelab.trajectory.average import UnstableCheckpoint, average_checkpoints
from mergelab.trajectory.discovery import RunCheckpoint, discover, select
from mergelab.trajectory.recover import before_spike, resume_files
from mergelab.trajectory.schedules import scheme_weights


def _stable(run_dir, calm: list, spiked: list, unstable) -> tuple[list, list]:
    """(the checkpoints before any loss spike that hold no NaN/Inf, every skipped one with why, by step)."""
    bad = {c.path for c, _ in unstable}
    stable = [c for c in calm if c.path not in bad]
    skipped = sorted([*spiked, *unstable], key=lambda s: s[0].step)
    if not stable:
        raise CheckpointError(f"no stable checkpoint in {run_dir}: " + "; ".join(
            f"{c.path.name}: {why}" for c, why in skipped))
    return stable, skipped


def plan_average(run_dir, *, scheme: str = "sma", last: int | None = None, every: int = 1,
                 decay: str = "linear", alpha: float = 0.9, skip_unstable: bool = False,
                 explicit=None, unstable: Sequence[tuple[RunCheckpoint, str]] = ()
                 ) -> tuple[list[RunCheckpoint], list[float], list]:
    """Which checkpoints, with which weights, and which were skipped and why; no weights are read.

    With `skip_unstable`, checkpoints saved at or after a loss spike are left
    out, and so are `unstable` ones ((checkpoint, why) pairs an earlier pass
    found holding NaN/Inf; see average_run).
    """
    found = discover(run_dir, explicit=explicit)
    skipped: list = []
    if skip_unstable:
        found, skipped = _stable(run_dir, *before_spike(Path(run_dir), found), unstable)
    chosen = select(found, last=last, every=every)
    weights = scheme_weights(scheme, len(chosen), alpha=alpha, decay=decay)
    return chosen, weights, skipped


def _skipping_unstable(pick, average, skip: bool):
    """Run `average(chosen, weights, skipped)` on `pick(unstable)`; with `skip`, a checkpoint the pass
    finds holding NaN/Inf is left out and the choice made again (nothing was written).

    One pass reads each chosen checkpoint once; a NaN/Inf found in it stops the
    pass where it was found (usually at the first tensor of a diverged
    checkpoint), so only what came before is read again, by the next pass.
    """
    unstable: list[tuple[RunCheckpoint, str]] = []
    reread = 0
    while True:
        chosen, weights, skipped = pick(unstable)
        try:
            report = average(chosen, weights, skipped)
        except UnstableCheckpoint as exc:
            if not skip:
                raise
            bad = chosen[exc.index]
            unstable.append((bad, f"tensor {exc.tensor} holds NaN/Inf"))
            reread += exc.bytes_read
            continue
        report.skipped = [(c.step, str(c.path), why) for c, why in skipped]
        report.bytes_reread = reread
        return report


def _with_partial(info: dict):
    """extra_files_fn: the JSON summary, with the deviation cosines and the tensors from fewer checkpoints."""
    name = next(iter(info))
    body = info[name]

    def files(report) -> dict[str, str]:
        return {name: json.dumps({**body, "correlation": report.correlation,
                                  "tensors_from_fewer_checkpoints": report.partial}, indent=2)}
    return files


def average_run(run_dir, out_dir, *, scheme="sma", last=None, every=1, decay="linear", alpha=0.9,
                skip_unstable=False, out_shard_size="5GB", overwrite=False, show_progress=True,
                explicit=None, allow_missing_tensors: bool = False):
    """Average a run's checkpoints under `scheme` into out_dir (engine plan; each checkpoint read once).

    Returns the AverageReport: checkpoints used with their weights, those skipped and why,
    tensors from fewer checkpoints, the deviation cosines with their advice, bytes read.
    """
    shard_size = parse_size(out_shard_size)
    check_output(out_dir, kind="folder", inputs=[run_dir, *(explicit or [])], overwrite=overwrite,
                 what="output folder")

    def pick(unstable):
        return plan_average(run_dir, scheme=scheme, last=last, every=every, decay=decay, alpha=alpha,
                            skip_unstable=skip_unstable, explicit=explicit, unstable=unstable)

    def average(chosen, weights, skipped):
        info = {"scheme": scheme, "decay": decay if scheme == "wsm" else None,
                "alpha": alpha if scheme == "ema" else None,
                "used": [{"step": c.step, "path": str(c.path), "weight": w} for c, w in zip(chosen, weights)],
                "skipped": [{"step": c.step, "path": str(c.path), "why": why} for c, why in skipped]}
        return average_checkpoints(chosen, weights, out_dir, shard_size=shard_size, overwrite=overwrite,
                                   show_progress=show_progress,
                                   extra_files_fn=_with_partial({"mergelab_average.json": info}),
                                   allow_missing_tensors=allow_missing_tensors)

    return _skipping_unstable(pick, average, skip_unstable)


def recover_run(run_dir, out_dir, *, last: int = 3, overwrite: bool = False, show_progress: bool = False,
                allow_missing_tensors: bool = False):
    """Average the newest `last` stable checkpoints; copy the newest stable one's optimizer state beside them.

    Stable: saved before any loss spike, and holding no NaN/Inf (found by the
    average's own pass, which reads each checkpoint once). The
    optimizer/scheduler/trainer state is copied into the output's temporary
    folder with the weights, so the folder appears complete or not at all.
    """
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise InvalidInput(f"last must be a whole number of checkpoints, 1 or more (got {last!r}); "
                           "last=3 averages the three newest stable checkpoints", option="last")
    check_output(out_dir, kind="folder", inputs=[run_dir], overwrite=overwrite, what="output folder")
    found = discover(run_dir)
    calm, spiked = before_spike(Path(run_dir), found)

    def pick(unstable):
        stable, skipped = _stable(run_dir, calm, spiked, unstable)
        chosen = stable[-min(last, len(stable)):]
        return chosen, scheme_weights("sma", len(chosen)), skipped

    def average(chosen, weights, skipped):
        info = {"used": [{"step": c.step, "path": str(c.path)} for c in chosen],
                "skipped": [{"step": c.step, "path": str(c.path), "why": why} for c, why in skipped],
                "resume_state_from": str(chosen[-1].path)}
        return average_checkpoints(chosen, weights, out_dir, overwrite=overwrite, show_progress=show_progress,
                                   extra_files_fn=_with_partial({"mergelab_recover.json": info}),
                                   copy_files=resume_files(chosen[-1]), allow_missing_tensors=allow_missing_tensors)

    return _skipping_unstable(pick, average, True)
