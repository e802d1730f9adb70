"""The one small error hierarchy of mergelab.

Every message names what is at fault (file, tensor, recipe field) and what to do.
Messages speak the library's language: a Python keyword (`allow_nonfinite=True`) or a
recipe field, never a command-line flag. An error whose fix is an option carries it
as `option` (the keyword / field name); `mergelab.cli.flags` maps it to the flag the
command line shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class MergeError(Exception):
    """Base class of every error mergelab raises on purpose.

    `option`: the Python keyword or recipe field that fixes the problem (e.g.
    "allow_nonfinite"), or None; the CLI names its flag when it shows the error.
    """

    option: str | None = None

    def __init__(self, *args: object, option: str | None = None):
        super().__init__(*args)
        self.option = option

    def __reduce__(self):  # keeps `option` across pickling (worker processes)
        return (_rebuild, (type(self), self.args, self.__dict__))


@contextlib.contextmanager
def fixed_by(option: str) -> Iterator[None]:
    """A MergeError raised inside (e.g. reading the file given as `option`) carries `option`, unless it has one."""
    try:
        yield
    except MergeError as exc:
        if exc.option is None:
            exc.option = option
        raise


def _rebuild(cls: type, args: tuple, state: dict) -> MergeError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class RecipeError(MergeError):
    """A recipe is invalid. Holds every problem found, so they are reported together."""

    def __init__(self, problems: list[str] | str, source: str | None = None, *, option: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = prefix + self.problems[0]
        else:
            text = prefix + f"{len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text, option=option)


class CheckpointError(MergeError):
    """A checkpoint cannot be read or written."""


class ShapeMismatch(MergeError):
    """Tensors that must be merged together have different shapes."""


class StatsError(MergeError):
    """Statistics (Fisher, Gram, optimizer state) do not fit the model they belong to."""


class OutputError(MergeError):
    """An output path may not be written (it is an input, is not mergelab's to replace, ...) or writing failed."""


class InvalidInput(MergeError, ValueError):
    """A bad argument or input value (also a ValueError, for Python callers that catch those)."""


class NonFiniteError(MergeError):
    """Input tensors hold NaN or Inf where a finite model is expected."""
