"""Marks each collected test by what it does, so that `make test-fast` can leave out the slow kinds.

A test is marked from the source of its function, the fixtures it uses and the helpers both call (followed
into every module under tests/), so marks follow a test when it moves to another file:
  subprocess   starts another process (the CLI or python in a subprocess, os.fork);
  distributed  runs torch.distributed on several processes (torch.multiprocessing, torchrun);
  fault        kills a process on purpose (kill -9, SIGTERM) to check what it leaves behind.
`slow` is also given, by name, to the tests in SLOW below (a few seconds each on a 2-core machine).
Marks only select: `make test` runs every test whatever its marks.
"""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

KINDS = {
    "subprocess": re.compile(r"\bsubprocess\.|\bsys\.executable\b|\bPopen\b|\bos\.fork\b"),
    "distributed": re.compile(r"\btorch\.multiprocessing\b|\btorch\.distributed\.run\b|\bmp\.spawn\b"),
    "fault": re.compile(r"\bos\.kill\b|\bos\.killpg\b|\bSIGKILL\b|\bSIGTERM\b"),
}

# Test functions (by name, wherever they live) that take seconds each: the compiled kernels against their
# references on big tensors, end-to-end runs of examples and demos. Measured with --durations on 2 cores.
SLOW = {
    "test_thinned_kernels_equal_reference",
    "test_sce_kernel_equals_reference",
    "test_ties_kernel_equals_reference",
    "test_linear_kernel_equals_reference_and_float64",
    "test_task_arithmetic_kernel_equals_reference_bit_for_bit_and_float64",
    "test_slerp_kernel_equals_reference_and_the_formula",
    "test_kth_largest_matches_kthvalue_on_big_tensors",
}


def _in_tests(obj) -> bool:
    try:
        return Path(inspect.getsourcefile(obj) or "").resolve().is_relative_to(TESTS)
    except TypeError:
        return False


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name `code` and the functions nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _helpers(func, names: set[str]) -> list:
    """The functions under tests/ that `func` may call by these names (directly, or as module.name)."""
    found = []
    for value in (func.__globals__.get(n) for n in names):
        if isinstance(value, types.FunctionType) and _in_tests(value):
            found.append(value)
        elif isinstance(value, types.ModuleType) and _in_tests(value):
            found += [v for n in names if isinstance(v := getattr(value, n, None), types.FunctionType)]
    return found


def source_of(funcs) -> str:
    """The source of these test functions and of every helper under tests/ they reach."""
    seen, todo, parts = set(), list(funcs), []
    while todo:
        func = inspect.unwrap(todo.pop())
        if not isinstance(func, types.FunctionType) or func.__code__ in seen:
            continue
        seen.add(func.__code__)
        try:
            parts.append(inspect.getsource(func))
        except (OSError, TypeError):
            continue
        todo += _helpers(func, _names(func.__code__))
    return "\n".join(parts)


def _fixture_funcs(item) -> list:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [defs[-1].func for name in item.fixturenames if (defs := info.name2fixturedefs.get(name))]


def mark_items(items) -> None:
    """Add the subprocess, distributed, fault and slow marks described above to the collected items."""
    cache: dict[tuple, set[str]] = {}
    for item in items:
        func = getattr(item, "function", None)
        if func is None:
            continue
        funcs = [func, *_fixture_funcs(item)]
        key = tuple(f.__code__ for f in map(inspect.unwrap, funcs) if hasattr(f, "__code__"))
        if key not in cache:
            text = source_of(funcs)
            cache[key] = {kind for kind, pattern in KINDS.items() if pattern.search(text)}
        kinds = set(cache[key])
        if getattr(item, "originalname", item.name) in SLOW:
            kinds.add("slow")
        for kind in sorted(kinds):
            item.add_marker(getattr(pytest.mark, kind))
