"""Optional dependencies: the library runs without matplotlib and scipy, and names the extra when asked for them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab.extras import MissingExtra, require

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("matplotlib", "scipy"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
"""


def test_require_names_the_extra():
    with pytest.raises(MissingExtra, match=r"plotting needs matplotlib.*pip install 'mergelab\[plots\]'"):
        require("matplotlib.not_a_module", "plotting")
    assert require("math", "arithmetic").sqrt(4.0) == 2.0


def test_library_works_without_matplotlib_and_scipy(tmp_path):
    code = BLOCK + """
import torch, mergelab
from mergelab.analysis import inspect_models
a, b = {"w": torch.ones(3, 2)}, {"w": torch.zeros(3, 2)}
merged = mergelab.merge_state_dicts("linear", [a, b], weight=[0.5, 0.5])
assert torch.allclose(merged["w"], torch.full((3, 2), 0.5))
report = inspect_models([a, b])
assert report.overall.n_params == 6
from mergelab.analysis.plots import plot_layer_similarity
from mergelab.extras import MissingExtra
try:
    plot_layer_similarity(report, "x.png")
except MissingExtra as exc:
    print("refused:", exc)
assert "matplotlib" not in sys.modules and "scipy" not in sys.modules
"""
    import mergelab

    src = str(Path(mergelab.__file__).resolve().parents[1])  # this checkout, whatever the working folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: plotting needs matplotlib" in done.stdout and "mergelab[plots]" in done.stdout
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_without_matplotlib_fails_before_the_work(tmp_path, monkeypatch):
    from mergelab.cli.main import app

    for i in range(2):
        (tmp_path / f"m{i}").mkdir()
        save_file({"w": torch.randn(4, 3)}, str(tmp_path / f"m{i}" / "model.safetensors"))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    called = []
    monkeypatch.setattr("mergelab.analysis.inspect_models", lambda *a, **k: called.append(1))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m0"), str(tmp_path / "m1"),
                                      "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2
    assert "pip install 'mergelab[plots]'" in " ".join(result.output.split())
    assert not called and not (tmp_path / "p.png").exists()
