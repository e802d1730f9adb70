"""Only mergelab.checkpoint opens or writes weight files: no other module imports safetensors or calls
torch.save / torch.load / safe_open.

The source is parsed (ast), so docstrings and comments that mention these names do not count.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import mergelab

SRC = Path(mergelab.__file__).parent
ALLOWED = SRC / "checkpoint"
_TORCH_IO = {"save", "load"}


def _is_safetensors(module: str | None) -> bool:
    return module is not None and (module == "safetensors" or module.startswith("safetensors."))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _call_problem(node: ast.Call) -> str | None:
    name = _dotted(node.func)
    if name in ("torch.save", "torch.load"):
        return f"calls {name}"
    if name.rsplit(".", 1)[-1] == "safe_open":
        return "calls safe_open"
    first = node.args[0] if node.args else None
    if (name.rsplit(".", 1)[-1] in ("import_module", "__import__") and isinstance(first, ast.Constant)
            and isinstance(first.value, str) and _is_safetensors(first.value)):
        return f"imports {first.value} by name"
    return None


def violations(source: str) -> list[str]:
    """`line: what` for every use of safetensors or torch file I/O in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: imports {a.name}" for a in node.names if _is_safetensors(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if _is_safetensors(node.module):
                found.append(f"{node.lineno}: imports from {node.module}")
            elif node.module == "torch" and any(a.name in _TORCH_IO for a in node.names):
                found.append(f"{node.lineno}: imports torch.save/torch.load by name")
        elif isinstance(node, ast.Call):
            problem = _call_problem(node)
            if problem:
                found.append(f"{node.lineno}: {problem}")
    return found


def test_the_scan_catches_each_kind_of_use():
    bad = textwrap.dedent('''
        """torch.save(x) in a docstring is fine."""
        import safetensors.torch
        from safetensors.torch import load_file
        from safetensors import safe_open
        from torch import load
        import torch
        torch.save({}, "x.pt")  # torch.load in a comment is fine
        torch.load("x.pt", weights_only=True)
        with safe_open("x.safetensors", "pt") as f:
            pass
        importlib.import_module("safetensors.torch")
        ''')
    lines = sorted(int(v.split(":")[0]) for v in violations(bad))
    assert lines == [3, 4, 5, 6, 8, 9, 10, 12]
    assert violations('"""safetensors, torch.load"""\n# torch.save\nx = "safe_open"\n') == []


def test_no_module_outside_checkpoint_reads_or_writes_weight_files():
    assert ALLOWED.is_dir()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        if path.is_relative_to(ALLOWED):
            continue
        rel = path.relative_to(SRC.parent)
        problems += [f"{rel}:{v}" for v in violations(path.read_text(encoding="utf-8"))]
    assert not problems, ("file I/O of weights belongs in mergelab.checkpoint (tensor_file, state_file, peft, "
                          "...); found outside it:\n" + "\n".join(problems))
