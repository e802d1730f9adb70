"""The engine's three-thread pipeline (prefetch / merge / write) and what it relies on in the kernels.

Checked here: the bounded write queue keeps at most WRITE_QUEUE_BYTES of outputs
waiting and still writes every tensor right; an error on the writer thread (a
full disk) stops the merge with nothing left behind; the streaming kernels
release the GIL (else the writer waits while a kernel runs) and run on one
thread without changing the caller's numba thread count.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelab
from mergelab import engine
from mergelab.engine import items as engine_items
from mergelab.checkpoint.writer import CheckpointWriter
from mergelab.errors import CheckpointError


def _two_models(tmp_path, rows=64, cols=256, count=6):
    paths = []
    for k, scale in enumerate((1.0, -2.0)):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        tensors = {f"layers.{i}.weight": torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
                   * scale + i for i in range(count)}
        save_file(tensors, folder / "model.safetensors")
        paths.append(folder)
    return paths


def _linear(paths):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, (0.25, 0.75))]}


def test_write_queue_holds_at_most_its_budget_and_writes_every_tensor(tmp_path, monkeypatch):
    paths = _two_models(tmp_path)
    one = 64 * 256 * 4  # bytes of one output tensor
    monkeypatch.setattr(engine_items, "WRITE_QUEUE_BYTES", 2 * one)
    slow_write = CheckpointWriter.write

    def write(self, name, tensor):  # a slow disk: outputs pile up in the queue
        time.sleep(0.05)
        slow_write(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", write)
    peak = [0]
    put = engine.WriteQueue.put

    def watched_put(self, nbytes, fn, *args):
        put(self, nbytes, fn, *args)
        peak[0] = max(peak[0], sum(n for f, n in self.flight if not f.done()))

    monkeypatch.setattr(engine.WriteQueue, "put", watched_put)
    mergelab.merge(_linear(paths), tmp_path / "out")
    assert one <= peak[0] <= 2 * one
    got = load_file(tmp_path / "out" / "model.safetensors")
    for i in range(6):
        base = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)
        # 0.25 (x + i) + 0.75 (-2x + i) = -1.25 x + i, hand-worked
        assert torch.equal(got[f"layers.{i}.weight"], 0.25 * (base + i) + 0.75 * (-2 * base + i))


def test_error_on_the_writer_thread_stops_the_merge_and_leaves_nothing(tmp_path, monkeypatch):
    paths = _two_models(tmp_path)
    write = CheckpointWriter.write
    calls = []

    def failing(self, name, tensor):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise CheckpointError(f"writing tensor {name} failed (No space left on device); is the disk full?")
        write(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", failing)
    with pytest.raises(CheckpointError, match="No space left"):
        mergelab.merge(_linear(paths), tmp_path / "out")
    assert all(name.startswith("mergelab-write") for name in calls)  # written off the merging thread
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder left


def test_streaming_kernels_release_the_gil_and_keep_the_callers_thread_count():
    numba = pytest.importorskip("numba")
    from mergelab.methods.kernels import finite, linear, one_thread, sce, slerp, thinned

    kernels = [slerp._sums, slerp._combine, sce._squares, sce._combine, sce._combine_pair, linear._weighted_sum,
               linear._weighted_sum_pair, finite._count, thinned._random_mask, thinned._l1_sums,
               thinned._combine_pair_linear]
    assert all(k.targetoptions.get("nogil") for k in kernels)
    before = numba.get_num_threads()
    seen = {}

    def other():
        seen["other"] = numba.get_num_threads()

    with one_thread():
        seen["inside"] = numba.get_num_threads()
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["inside"] == 1 and numba.get_num_threads() == before
    assert seen["other"] == numba.config.NUMBA_NUM_THREADS  # a thread's count is its own

