"""Read-ahead and release of tensors' pages in memory-mapped checkpoints (madvise bookkeeping).

The engine merges from memory-map views of its inputs, never from copies: it
asks for a work item's pages to be mapped in from a background thread while the
previous item computes (`prefetch`), takes the views (`views`), checks the files
did not change under it (`check_unchanged`), and drops the pages once done
(`release`), so resident memory stays at about two items' inputs whatever the
model size. A tensor reference is anything with `.model` (index into the
checkpoints) and `.name`; `rows` is a row range (start, stop) of dim 0, or None
for the whole tensor.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from mergelab.checkpoint.reader import Checkpoint

# madvise() advice that maps a range's pages in ahead of use (Linux 5.14+); older kernels get WILLNEED.
POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


class TensorKey(Protocol):
    model: int
    name: str


class Prefetcher:
    """Page bookkeeping for tensors of several checkpoints, addressed by (model index, name)."""

    def __init__(self, checkpoints: Sequence[Checkpoint]):
        self.ckpts = list(checkpoints)
        self.populate = POPULATE_READ  # None once the kernel refused it: read-ahead hints from then on

    def span(self, ref: TensorKey, rows: tuple[int, int] | None) -> tuple[int, int] | None:
        """`rows` clipped to the tensor's first dimension (a vocabulary-resized input may be shorter)."""
        if rows is None:
            return None
        n = self.ckpts[ref.model].shape(ref.name)[0]
        return min(rows[0], n), min(rows[1], n)

    def views(self, refs: Iterable[Any], rows: tuple[int, int] | None) -> dict[Any, torch.Tensor]:
        """ref -> memory-map view of its tensor (or of its rows); nothing is read yet."""
        return {ref: self.ckpts[ref.model].view(ref.name, self.span(ref, rows)) for ref in refs}

    def _advise(self, refs: Iterable[TensorKey], rows: tuple[int, int] | None, advice: int) -> bool:
        results = [self.ckpts[ref.model].advise(ref.name, advice, self.span(ref, rows))
                   for ref in dict.fromkeys(refs)]
        return all(results)

    def prefetch(self, refs: Sequence[TensorKey], rows: tuple[int, int] | None) -> None:
        """Map the pages in (MADV_POPULATE_READ, else a WILLNEED hint), then check the files are unchanged."""
        if self.populate is None or not self._advise(refs, rows, self.populate):
            self.populate = None
            self._advise(refs, rows, mmap.MADV_WILLNEED)
        self.check_unchanged(refs)

    def check_unchanged(self, refs: Iterable[TensorKey]) -> None:
        """CheckpointError if a file holding one of `refs` changed (size, mtime, inode) since it was opened.

        Call it after prefetching (before the pages are touched, so a truncated file is an
        error, not SIGBUS) and after computing (before the output is written, so bytes
        changed in place mid-item are never used).
        """
        by_model: dict[int, list[str]] = {}
        for ref in refs:
            by_model.setdefault(ref.model, []).append(ref.name)
        for model, names in by_model.items():
            self.ckpts[model].check_unchanged(names)

    def release(self, refs: Sequence[TensorKey], rows: tuple[int, int] | None) -> None:
        """Drop the pages (MADV_DONTNEED): the page cache keeps the file, this process stops holding them."""
        self._advise(refs, rows, mmap.MADV_DONTNEED)
