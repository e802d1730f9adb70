"""Compiled accelerators registered beside their methods.

A method is the readable reference: a pure function on stacked float32
tensors. A kernel (numba, CPU) computes the same numbers from the inputs as
stored (bfloat16 or float32, one tensor per model) and writes the output dtype
in the same pass, saving the float32 copies. `methods.run_method` chooses: the
kernel when kernels are on and its `supports` predicate accepts the inputs,
else the reference.

Threads. Kernels are compiled `nogil`, so that while one merges a tensor the
engine's prefetch and writer threads keep going (reading the next inputs,
writing the last output). The streaming kernels (linear, slerp, sce, dare)
run on one thread each (`one_thread`): they are vectorised and move about 1 GB/s per core,
far above the disk's write speed, while numba's parallel loops cost a thread
wake-up per call that on a busy machine was 20-40 ms (more than the work on
most tensors of a 1B model; measured in docs/results-kernels-io.md). The
engine's three threads are the parallelism.

One switch turns every kernel off (`kernels_disabled()`, for tests that
compare the two; or MERGELAB_NO_KERNELS=1 in the environment, read here once
when mergelab is imported, nowhere else).
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Kernel", "kernels_enabled", "kernels_disabled", "set_kernels_enabled", "lazy_kernel", "has_nonfinite",
           "at_most_threads", "one_thread"]

_ENABLED = not os.environ.get("MERGELAB_NO_KERNELS")


def kernels_enabled() -> bool:
    return _ENABLED


def set_kernels_enabled(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = bool(enabled)


@contextlib.contextmanager
def kernels_disabled() -> Iterator[None]:
    """Run the readable reference of every method inside the block."""
    before = kernels_enabled()
    set_kernels_enabled(False)
    try:
        yield
    finally:
        set_kernels_enabled(before)


@contextlib.contextmanager
def at_most_threads(n: int) -> Iterator[None]:
    """Run numba's parallel loops inside the block on at most `n` (>= 1) of the calling thread's threads.

    numba's thread count is kept per calling thread, so other threads are not
    affected; the count is restored on the way out.
    """
    import numba

    before = numba.get_num_threads()
    want = max(1, min(before, n))
    if want == before:
        yield
        return
    numba.set_num_threads(want)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """Run numba's parallel loops inside the block on the calling thread alone.

    A loop compiled `parallel=True` and run on one thread is still the faster
    code: numba's parallel lowering vectorises loops that the plain one does
    not (a bfloat16 weighted sum 0.05 s against 0.23-0.32 s for 65M entries),
    and no worker thread has to wake up.
    """
    return at_most_threads(1)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A method's accelerator.

    run(xs, base, p, s, gen, out_dtype) -> Tensor: xs one tensor per model as stored,
        base as stored (or None); returns the merged tensor in out_dtype.
    supports(xs, base, p, s) -> bool: whether run applies to these inputs and parameters.
    entry(name) -> the kernel module's function `name` (the kernel's options bound), or None
        where it has none. Optional entries, for callers that merge the same inputs again and
        again into preallocated tensors (search candidates, search/fastpath.py):
          into(xs, base, p, s, out, state) -> None: run()'s numbers written into `out` (base's
              shape, float32 or bfloat16, contiguous, on the CPU);
          supports_into(xs, base, p, s) -> bool: where into applies (absent: supports);
          prepare(xs, base, p, s, keep) -> state or None: what into needs that depends on the
              inputs only (e.g. TIES's magnitude orders), made through keep(i, build, nbytes),
              the caller's once-per-search store for input i over the base (None: over its
              memory budget, and prepare gives None: run() is used instead).
    """

    run: Callable[..., Tensor]
    supports: Callable[..., bool]
    entry: Callable[[str], Callable[..., Any] | None] = lambda name: None


@functools.lru_cache(maxsize=None)
def compiled_module(module: str) -> Any:
    """`mergelab.methods.kernels.<module>`, imported (and numba with it) on first use; None without numba."""
    try:
        return importlib.import_module(f"mergelab.methods.kernels.{module}")
    except ImportError as exc:  # numba missing or broken here: the readable code gives the numbers
        warnings.warn(f"the compiled {module} kernel is not available ({exc}); the readable code runs "
                      "instead, slower on big CPU tensors; install mergelab[fast] (numba) for it", stacklevel=3)
        return None


def lazy_kernel(module: str, **options: Any) -> Kernel:
    """The kernel of `mergelab.methods.kernels.<module>` (its `run` and `supports`), imported on first use.

    numba is imported only when a kernel is first asked about; where it cannot
    be imported, `supports` answers False and the reference runs. `options`
    (e.g. ties=True) are passed to both functions as keywords, so that one
    module serves several methods.
    """

    def load() -> Any:
        return compiled_module(module)

    def supports(xs: Sequence[Tensor], base: Tensor | None, p: Any, s: Any) -> bool:
        mod = load()
        return mod is not None and bool(mod.supports(xs, base, p, s, **options))

    def run(xs: Sequence[Tensor], base: Tensor | None, p: Any, s: Any, gen: torch.Generator | None,
            out_dtype: torch.dtype) -> Tensor:
        return load().run(xs, base, p, s, gen, out_dtype, **options)

    def entry(name: str) -> Callable[..., Any] | None:
        fn = getattr(load(), name, None)
        return None if fn is None else functools.partial(fn, **options) if options else fn

    return Kernel(run=run, supports=supports, entry=entry)


def has_nonfinite(t: Tensor) -> bool:
    """Whether a tensor holds NaN or Inf.

    One compiled pass over the exponent bits where numba is there (kernels/finite.py: CPU,
    contiguous, bfloat16/float16/float32); else a float32-accumulated sum, with the exact
    elementwise check only when that sum is not finite (finite values can overflow it).
    Integer tensors hold neither.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return False
    finite = compiled_module("finite")
    if finite is not None and finite.supports(t):
        return finite.has_nonfinite(t)
    if torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)):
        return False
    return not bool(torch.isfinite(t).all())
