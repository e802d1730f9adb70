"""The one place that decides whether mergelab may write a path, and writes it atomically.

Every command that writes (merge, average, recover, stats, inspect and
analyze reports and plots, extract, demo) goes through these functions. The
rules, in the spirit of git and rsync (never destroy what you did not create):

- a path that is empty, the file-system root, the home folder, the current
  folder or any folder above them is never an output;
- an output may not be an input, lie inside an input's folder, or contain one;
- an output given as a symbolic link is refused (checked before resolving it,
  so the link's target is never touched);
- an existing output is replaced only when the caller allows it, and a folder
  only when mergelab wrote it (it holds the marker file `MARKER`, or is empty);
- content goes to a hidden temporary name beside the output (`.NAME.partial-PID-RANDOM`),
  is flushed to disk, and is renamed into place only when complete; a killed
  run leaves only such a temporary, which `stale_partials` finds later.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from mergelab.errors import OutputError

__all__ = ["MARKER", "check_output", "partial_path", "atomic_file", "write_file_atomic",
           "stale_partials", "remove_partials", "replace_folder"]

# Written into every output folder mergelab makes; only such folders may be replaced.
MARKER = ".mergelab-output"
# Files that identify folders written by earlier mergelab versions (before MARKER existed).
_LEGACY_MARKERS = ("mergelab_report.json", "mergelab_average.json", "mergelab_recover.json")
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}(?:\.\w+)?$")


def _overwrite_hint() -> str:
    return "choose another path, or allow replacing it (overwrite=True)"


def _dangerous(resolved: Path) -> str | None:
    """Why a resolved path may never be an output, or None."""
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    if resolved == home or resolved in home.parents:
        return "it is your home folder or a folder above it"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or a folder above it (an empty or unset variable?)"
    return None


def _overlap(resolved: Path, inputs: Sequence[str | Path]) -> str | None:
    for item in inputs:
        p = Path(item).expanduser().resolve()
        if resolved == p:
            return f"it is the input {item}"
        if p in resolved.parents:
            return f"it lies inside the input {item}"
        if resolved in p.parents:
            return f"it contains the input {item}"
    return None


def _written_by_mergelab(folder: Path) -> bool:
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    return not names or MARKER in names or any(m in names for m in _LEGACY_MARKERS)


def check_output(path: str | Path, *, kind: str, inputs: Sequence[str | Path] = (),
                 overwrite: bool = False, what: str = "output") -> Path:
    """Validate an output path before any work is done; returns it resolved.

    Args:
        path: the output as the user gave it.
        kind: "folder" or "file".
        inputs: every input file or folder of the command.
        overwrite: whether an existing output (a file, or a folder mergelab wrote) may be replaced.
        what: how the output is named in messages ("OUT_DIR", "--json file", ...).

    Raises:
        OutputError: naming the path and what to do.
    """
    raw = os.fspath(path) if not isinstance(path, str) else path
    if raw.strip() == "":
        raise OutputError(f"the {what} path is empty (an unset shell variable?); give a real path")
    given = Path(raw).expanduser()
    if given.is_symlink():
        raise OutputError(f"{what} {raw} is a symbolic link; refusing to write through it "
                          "(its target would be replaced); give the real path")
    resolved = given.resolve()
    why = _dangerous(resolved) or _overlap(resolved, inputs)
    if why:
        raise OutputError(f"refusing to use {raw} as the {what}: {why}; choose a new path of its own")
    if resolved.exists():
        if not overwrite:
            raise OutputError(f"{what} {raw} already exists; {_overwrite_hint()}", option="overwrite")
        if kind == "folder":
            if not resolved.is_dir():
                raise OutputError(f"{what} {raw} exists and is not a folder; remove it yourself or choose another path")
            if not _written_by_mergelab(resolved):
                raise OutputError(f"{what} {raw} is a folder mergelab did not write (no {MARKER} in it) and not "
                                  "empty; refusing to replace it; remove it yourself or choose another path")
        elif not resolved.is_file():
            raise OutputError(f"{what} {raw} exists and is not a regular file; refusing to replace it")
    parent = resolved.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {parent} for the {what} ({exc.strerror or exc}); "
                          "check the path and permissions") from exc
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write into {parent} (no permission) for the {what}; choose another path")
    return resolved


def partial_path(target: Path) -> Path:
    """A fresh hidden temporary name beside `target`; the process id lets later runs tell stale ones.

    A file keeps its suffix at the end (`.plot.png.partial-123-0a1b2c3d.png`), so tools that
    choose a format by extension (matplotlib) write the right one.
    """
    return target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, inputs: Sequence[str | Path] = (), overwrite: bool = False,
                what: str = "output", checked: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is synced and renamed onto `path`.

    On any exception (or KeyboardInterrupt/SIGTERM turned into one) the
    temporary file is removed and `path` is left as it was. `checked`: the
    caller already ran check_output on `path` (its folder is made if missing).
    """
    if checked:  # the caller ran check_output on this path already
        target = Path(path).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
    else:
        target = check_output(path, kind="file", inputs=inputs, overwrite=overwrite, what=what)
    temp = partial_path(target)
    try:
        yield temp
        if not temp.exists():
            raise OutputError(f"nothing was written for {what} {target}")
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        if target.exists() and not overwrite:
            raise OutputError(f"{what} {target} appeared while this ran; {_overwrite_hint()}", option="overwrite")
        os.replace(temp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise OutputError(f"writing {what} {target} failed ({exc.strerror or exc}); is the disk full? "
                          "nothing was written there") from exc
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def write_file_atomic(path: str | Path, content: bytes | str, **kwargs) -> Path:
    """Write `content` to `path` through `atomic_file` (same keyword arguments); returns the resolved path."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    with atomic_file(path, **kwargs) as temp:
        temp.write_bytes(data)
    return Path(path).expanduser().resolve()


def replace_folder(temp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename a finished temporary folder onto `target`.

    An existing target (already checked by `check_output`) is moved aside,
    the new one renamed in, then the old one deleted: at every moment `target`
    is either the complete old output or the complete new one.
    """
    if not (target.exists() or target.is_symlink()):
        os.rename(temp, target)
    elif not overwrite:
        raise OutputError(f"{target} appeared while this ran; {_overwrite_hint()}", option="overwrite")
    elif target.is_symlink() or not target.is_dir() or not _written_by_mergelab(target):
        raise OutputError(f"{target} was replaced by something mergelab did not write while this ran; "
                          "refusing to replace it")
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
        try:
            os.rename(temp, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def stale_partials(folder: str | Path) -> list[tuple[Path, int]]:
    """Temporaries left in `folder` by mergelab runs that died: (path, bytes), oldest first.

    A temporary is stale when the process that made it (its name carries the
    pid) no longer runs; names from versions before the pid was recorded
    count as stale too.
    """
    folder = Path(folder)
    found = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _PARTIAL.match(p.name)
        if not m or p.is_symlink():
            continue
        pid = m.group("pid")
        if pid is not None and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if pid is not None and int(pid) == os.getpid():
            continue
        found.append(p)
    found.sort(key=lambda p: p.stat().st_mtime)
    return [(p, _size(p)) for p in found]


def remove_partials(paths: Sequence[Path]) -> None:
    """Delete stale temporaries (only names `stale_partials` recognises)."""
    for p in paths:
        if not _PARTIAL.match(p.name) or p.is_symlink():
            raise OutputError(f"{p} is not a mergelab temporary; refusing to delete it")
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
