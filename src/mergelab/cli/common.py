"""What every command shares: consoles, the error policy, and writing outputs safely.

Error policy: a `MergeError` (mergelab's own, raised for anything the user can
get wrong) becomes one line on stderr and exit code 2. Any other exception is
a bug: it keeps its traceback (see `main.main`) and asks to be reported.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from mergelab.errors import MergeError

console = Console(stderr=True)
out = Console()

# An error message longer than this is cut (e.g. a recipe value of megabytes echoed back).
MAX_MESSAGE = 4000

OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing output mergelab wrote earlier")
CLEAN_PARTIALS = typer.Option(False, "--clean-partials", help="delete temporaries left beside the output by "
                              "mergelab runs that were killed (they are listed otherwise)")


def fail(exc: BaseException) -> None:
    from mergelab.cli.flags import with_flags

    text = with_flags(str(exc), getattr(exc, "option", None))
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + f" ... [{len(text) - MAX_MESSAGE} more characters]"
    # soft_wrap keeps long paths in one piece, so they can be copied from the message; escaped,
    # so that brackets in it (mergelab[plots], a path or tensor name) are printed, not read as markup.
    console.print(f"[bold red]error:[/] {escape(text)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn mergelab's own errors into one line and exit code 2; let everything else through."""
    try:
        yield
    except MergeError as exc:
        fail(exc)


def check_outputs(outputs: Sequence[tuple[Optional[Path], str, str]], inputs: Sequence[Path | str],
                  overwrite: bool) -> None:
    """Check (path, kind, what) outputs before any work starts; None paths are skipped."""
    from mergelab.checkpoint.output import check_output

    for path, kind, what in outputs:
        if path is not None:
            check_output(path, kind=kind, inputs=inputs, overwrite=overwrite, what=what)


def write_json(path: Path, payload: Mapping[str, Any], *, inputs: Sequence[Path | str] = (),
               overwrite: bool = False) -> None:
    from mergelab.checkpoint.output import write_file_atomic

    write_file_atomic(path, json.dumps(payload, indent=2) + "\n", inputs=inputs, overwrite=overwrite,
                      what="--json file")
    out.print(f"JSON written to {path}", soft_wrap=True)


def need_plots(plot: Path | None) -> None:
    """With --plot, check before any work that matplotlib (the plots extra) can be imported."""
    if plot is not None:
        from mergelab.extras import require

        require("matplotlib.figure", "--plot")
        require("matplotlib.backends.backend_agg", "--plot")


def save_plot(plotter: Callable[[Any, Path], Any], result: Any, path: Path, *,
              inputs: Sequence[Path | str] = (), overwrite: bool = False) -> None:
    from mergelab.checkpoint.output import atomic_file

    with atomic_file(path, inputs=inputs, overwrite=overwrite, what="--plot file") as temp:
        plotter(result, temp)
    out.print(f"plot written to {path}", soft_wrap=True)


def report_partials(out_path: Path | str, clean: bool) -> None:
    """List (or, with --clean-partials, delete) temporaries of killed runs beside an output."""
    from mergelab.checkpoint.output import remove_partials, stale_partials

    raw = str(out_path)
    if not raw.strip():
        return
    parent = Path(raw).expanduser().resolve().parent
    stale = stale_partials(parent)
    if not stale:
        return
    total = sum(size for _, size in stale)
    names = ", ".join(p.name for p, _ in stale[:5]) + (" ..." if len(stale) > 5 else "")
    if clean:
        remove_partials([p for p, _ in stale])
        console.print(f"removed {len(stale)} temporaries of killed runs in {parent} ({total / 1e6:.1f} MB): {names}",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"[yellow]note:[/] {len(stale)} temporaries of killed mergelab runs in {parent} hold "
                      f"{total / 1e6:.1f} MB: {names}; rerun with --clean-partials to delete them",
                      highlight=False, soft_wrap=True)
