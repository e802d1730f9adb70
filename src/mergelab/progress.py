"""Progress display for long work: tensors done, GB/s read, ETA (rich)."""

from __future__ import annotations

import sys

from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ByteProgress:
    """A bar over tensors with the input bytes' transfer speed; silent when disabled or not a TTY-friendly run."""

    def __init__(self, tensors: int, total_bytes: int, *, enabled: bool = True, label: str = "merging"):
        self.enabled = enabled
        self.tensors = tensors
        self.total_bytes = max(total_bytes, 1)
        self._progress: Progress | None = None
        self.label = label

    def __enter__(self) -> "ByteProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[tensors]}"),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=not sys.stderr.isatty(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total_bytes,
                                                 tensors=f"0/{self.tensors} tensors")
        self._done = 0
        return self

    def advance(self, nbytes: int, *, done: bool = True) -> None:
        if done:
            self._done += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=nbytes, tensors=f"{self._done}/{self.tensors} tensors")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
