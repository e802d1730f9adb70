"""Library errors name recipe fields, files and tensors; only src/mergelab/cli/ names command-line flags.

An AST walk over every string constant (f-string parts included) of src/mergelab outside cli/:
one that names a flag the `mergelab` command defines fails the test. Docstrings may document a
flag (they are not shown to a user as an error); comments are not in the AST.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mergelab"
CLI = SRC / "cli"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# Files allowed to name flags in their strings (none: every library message names keywords,
# recipe fields, files and tensors; the CLI adds the flag from MergeError.option).
ALLOWLIST: set[str] = set()


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _strings(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def _named_options(tree: ast.AST):
    """Flags typer derives from a parameter's name: `last: int = typer.Option(3)` is --last."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            for arg, default in zip(args, defaults + node.args.kw_defaults):
                if (isinstance(default, ast.Call) and getattr(default.func, "attr", None) == "Option"
                        and not any(isinstance(a, ast.Constant) and str(a.value).startswith("-")
                                    for a in default.args)):
                    yield "--" + arg.arg.replace("_", "-")


def cli_flags() -> set[str]:
    """Every flag the command line defines (the `--name` constants of cli/, and those typer names itself)."""
    flags = set()
    for path in CLI.rglob("*.py"):
        for _, text in _strings(path):
            if re.fullmatch(r"--[a-z][a-z0-9-]*", text):
                flags.add(text)
        flags.update(_named_options(ast.parse(path.read_text())))
    return flags


def library_files():
    for path in sorted(SRC.rglob("*.py")):
        if CLI not in path.parents:
            yield path


def test_the_scan_knows_the_flags():
    assert {"--allow-nonfinite", "--objective", "--overwrite", "--eval", "--base", "--last", "--every"} <= cli_flags()


def test_library_strings_name_no_flags():
    flags = cli_flags()
    found = []
    for path in library_files():
        rel = path.relative_to(SRC).as_posix()
        if rel in ALLOWLIST:
            continue
        for line, text in _strings(path):
            named = sorted({m for m in FLAG.findall(text) if m in flags})
            if named:
                found.append(f"src/mergelab/{rel}:{line}: {', '.join(named)} in {text[:70]!r}")
    assert not found, "library strings name command-line flags:\n" + "\n".join(found)


def test_allowlist_names_existing_files():
    for rel in ALLOWLIST:
        assert (SRC / rel).is_file(), f"{rel} in ALLOWLIST no longer exists; take it off"


def _option_hints() -> set[str]:
    """Every `option="..."` keyword given to a call in the library (the hints cli/flags.py maps)."""
    hints = set()
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "option" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                        hints.add(kw.value.value)
    return hints


def test_every_option_hint_has_a_flag():
    from mergelab.cli.flags import OPTION_FLAGS

    missing = sorted(_option_hints() - set(OPTION_FLAGS))
    assert not missing, f"option hints without a flag in cli/flags.py: {missing}"


@pytest.mark.parametrize("flag", sorted(__import__("mergelab.cli.flags", fromlist=["x"]).OPTION_FLAGS.values()))
def test_flags_table_names_real_flags(flag):
    assert flag.split()[0] in cli_flags()
