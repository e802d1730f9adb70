"""What identifies one version of an input file, so that a file changed under mergelab is noticed.

Readers record a file's FileState when they open it and compare it again at
each use; a file that was replaced, truncated, grown or modified since is
refused with one CheckpointError saying which of these happened.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from mergelab.errors import CheckpointError

__all__ = ["FileState", "changed_error", "check_path_unchanged", "open_regular", "regular_file_state"]


@dataclasses.dataclass(frozen=True)
class FileState:
    """What identifies one version of a file: compared to notice it changed under us."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileState:
        return cls(info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


def check_path_unchanged(path: Path, state: "FileState") -> None:
    """Raise CheckpointError if the file now at `path` is not the one whose state was recorded (or is gone)."""
    try:
        now: FileState | None = FileState.of(os.stat(path))
    except FileNotFoundError:
        now = None
    if now != state:
        raise changed_error(path, state, now)


def changed_error(path: Path, before: FileState, now: FileState | None) -> CheckpointError:
    """The error for an input that is not the file that was opened any more."""
    if now is None:
        what = "was deleted"
    elif (now.inode, now.device) != (before.inode, before.device):
        what = "was replaced by another file"
    elif now.size < before.size:
        what = f"was truncated from {before.size} to {now.size} bytes"
    elif now.size != before.size:
        what = f"grew from {before.size} to {now.size} bytes"
    else:
        what = "was modified"
    return CheckpointError(
        f"{path}: file changed or was truncated while reading (it {what} after mergelab opened it); "
        "its tensors cannot be trusted - wait until whatever is changing it has finished (or restore it), "
        "then run again")


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path` and its stat; refuses FIFOs, devices, folders."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is not a regular file (a folder, pipe or device); give the "
                              "weight file itself")
    return fd, info


def regular_file_state(path: Path) -> FileState:
    """The FileState of `path`, which must be a regular file (a FIFO would block the reader forever)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: is not a regular file (a folder, pipe or device); give the "
                              "weight file itself")
    return FileState.of(info)
