"""Fault injection for every writer: kill -9 and SIGTERM at random moments, and a disk that fills up.

Property, whatever the moment: no finished-looking output that is not finished
(the output folder exists only complete and correct), inputs byte-identical,
and a rerun succeeds. SIGTERM also leaves no temporary behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli.main import app


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _model(folder: Path, value: float, rows: int = 512) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(value * 10))
    save_file({f"model.layers.{i}.w": torch.randn(rows, 1024, generator=g) + value for i in range(8)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 8}))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    a, b = _model(root / "a", 1.0), _model(root / "b", 2.0)
    recipe = root / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.25}}, {"model": str(b), "parameters": {"weight": 0.75}}]}))
    run = root / "run"
    for i, v in enumerate((1.0, 2.0, 3.0)):
        ck = _model(run / f"checkpoint-{(i + 1) * 10}", v, rows=256)
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        (ck / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": (i + 1) * 10, "loss": 1.0}]}))
    expected = {n: 0.25 * load_file(str(a / "model.safetensors"))[n] + 0.75 * load_file(str(b / "model.safetensors"))[n]
                for n in load_file(str(a / "model.safetensors"))}
    return {"root": root, "a": a, "b": b, "recipe": recipe, "run": run, "expected": expected}


def _command(kind: str, inputs: dict, out: Path) -> list[str]:
    base = [sys.executable, "-m", "mergelab.cli"]
    return {
        "merge": [*base, "merge", str(inputs["recipe"]), str(out), "--quiet"],
        "average": [*base, "average", str(inputs["run"]), str(out), "--quiet"],
        "recover": [*base, "recover", str(inputs["run"]), str(out)],
    }[kind]


def _check_output(kind: str, inputs: dict, out: Path) -> None:
    """An output that exists is complete and right."""
    got = load_file(str(out / "model.safetensors"))
    if kind == "merge":
        assert set(got) == set(inputs["expected"])
        for n, t in got.items():
            torch.testing.assert_close(t, inputs["expected"][n])
    else:
        assert len(got) == 8 and (out / "config.json").is_file()
    if kind == "recover":
        assert (out / "trainer_state.json").stat().st_size > 0 and (out / "optimizer.pt").is_file()


_SPANS: dict[str, float] = {}


def _span(kind: str, inputs: dict, tmp_path: Path, env: dict) -> float:
    """Seconds one whole run takes (startup included), timed once per command."""
    if kind not in _SPANS:
        out = tmp_path / "timing"
        start = time.monotonic()
        subprocess.run(_command(kind, inputs, out), env=env, capture_output=True, timeout=120, check=True)
        _SPANS[kind] = time.monotonic() - start
        _check_output(kind, inputs, out)
    return _SPANS[kind]


@pytest.mark.parametrize("kind", ["merge", "average", "recover"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_writer_leaves_no_finished_looking_output(inputs, tmp_path, kind, sig):
    before = {k: digest(inputs[k]) for k in ("a", "b", "run")}
    rng = random.Random(f"{kind}-{int(sig)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    span = _span(kind, inputs, tmp_path, env)
    for trial in range(2):
        out = tmp_path / f"out{trial}"
        proc = subprocess.Popen(_command(kind, inputs, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, span))
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        if out.exists():  # it finished before the signal: then it must be whole
            _check_output(kind, inputs, out)
        leftovers = list(tmp_path.glob(f".{out.name}.partial-*"))
        if sig == signal.SIGTERM:
            assert not leftovers, (err, leftovers)  # SIGTERM cleans up like Ctrl-C
            assert "Traceback" not in err, err
        # A rerun into the same place succeeds; with --clean-partials it also removes a killed run's temporary.
        rerun = _command(kind, inputs, out) + ["--clean-partials"] + (["--overwrite"] if out.exists() else [])
        done = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        _check_output(kind, inputs, out)
        assert not list(tmp_path.glob(f".{out.name}.partial-*"))
    assert {k: digest(inputs[k]) for k in ("a", "b", "run")} == before


class FullDisk:
    """pwrite that fails with ENOSPC once `budget` bytes were written, like a small disk filling up."""

    def __init__(self, real, budget: int):
        self.real, self.budget = real, budget

    def __call__(self, fd, data, offset):
        n = len(memoryview(data).cast("B"))
        if n > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= n
        return self.real(fd, data, offset)


@pytest.mark.parametrize("budget", [0, 1024 * 1024, 5 * 1024 * 1024])
@pytest.mark.parametrize("kind", ["merge", "average", "recover"])
def test_full_disk_leaves_nothing_and_a_rerun_succeeds(inputs, tmp_path, monkeypatch, kind, budget):
    from mergelab.checkpoint import writer

    before = {k: digest(inputs[k]) for k in ("a", "b", "run")}
    out = tmp_path / "out"
    args = [a for a in _command(kind, inputs, out)[3:]]
    monkeypatch.setattr(writer, "pwrite_all", FullDisk(writer.pwrite_all, budget))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "disk full" in " ".join(result.output.split())
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()
    assert CliRunner().invoke(app, args).exit_code == 0
    _check_output(kind, inputs, out)
    assert {k: digest(inputs[k]) for k in ("a", "b", "run")} == before


def test_full_disk_while_writing_stats(tmp_path, monkeypatch):
    import safetensors.torch as st

    from mergelab.errors import OutputError
    from mergelab.stats.io import load_stats, save_stats

    stats = {"w": torch.rand(64, 64) + 0.1}
    out = tmp_path / "fisher.safetensors"
    out.write_bytes(b"the previous statistics")
    real = st.save_file

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", half_then_full)
    with pytest.raises(OutputError, match="disk full"):
        save_stats(out, stats, kind="fisher", overwrite=True)
    assert out.read_bytes() == b"the previous statistics"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["fisher.safetensors"]  # no temporary left
    monkeypatch.setattr(st, "save_file", real)
    save_stats(out, stats, kind="fisher", overwrite=True)
    torch.testing.assert_close(load_stats(out)[0]["w"], stats["w"])


_STATS_WRITER = """
import sys, torch
from mergelab.stats.io import save_stats
big = {f"w{i}": torch.rand(512, 1024) + 0.1 for i in range(24)}
save_stats(sys.argv[1], big, kind="fisher", overwrite=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_stats_writer_leaves_the_old_file_or_a_whole_new_one(tmp_path, sig):
    from mergelab.stats.io import load_stats

    out = tmp_path / "fisher.safetensors"
    out.write_bytes(b"old statistics")
    rng = random.Random(int(sig))
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", _STATS_WRITER, str(out)], check=True, timeout=120)
    span = time.monotonic() - start
    assert len(load_stats(out)[0]) == 24
    for _ in range(2):
        out.write_bytes(b"old statistics")
        proc = subprocess.Popen([sys.executable, "-c", _STATS_WRITER, str(out)], stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.2, span))
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        if out.read_bytes() != b"old statistics":  # replaced: then whole
            assert len(load_stats(out)[0]) == 24
        if sig == signal.SIGKILL:  # a temporary may remain; it never has the finished name
            assert all(".partial-" in p.name for p in tmp_path.iterdir() if p != out)
