"""Fuzzing the readers: whatever bytes a checkpoint holds, reading it succeeds exactly or raises CheckpointError.

Property, for mutated safetensors files, random and mutated index files and
random config files: opening the Checkpoint and reading every tensor (whole,
by rows, through the memory map) either gives exactly the tensors the
safetensors library reads from the same files (an independent reader), or
raises CheckpointError; never another exception, never more than a few
seconds, and the input files are byte-identical afterwards.

derandomize=True: the same examples on every run, so CI is reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.checkpoint.reader import Checkpoint
from mergelab.errors import CheckpointError

# Time is bounded by time_limit (an alarm that interrupts a real hang), not by hypothesis' deadline,
# which only measures an example after it returns and fails as Flaky on a busy CI machine.
FUZZ = settings(max_examples=120, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SECONDS_PER_EXAMPLE = 10


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds` (a hang is a failure)."""
    def on_alarm(signum, frame):
        raise Hang(f"reading took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _read_all(path: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor of the Checkpoint at `path`, read three ways that must agree; None if it was refused."""
    try:
        with Checkpoint(path) as ck:
            out = {}
            for name in ck:
                whole = ck[name]
                viewed = ck.view(name).clone()
                assert torch.equal(_bits(whole), _bits(viewed)), name
                if whole.dim() and whole.shape[0]:
                    assert torch.equal(_bits(ck.view(name, rows=(0, whole.shape[0]))), _bits(whole)), name
                ck.check_unchanged([name])
                out[name] = whole
            ck.num_layers, ck.tied_embeddings, ck.describe()  # metadata must not raise either
            return out
    except CheckpointError as exc:
        text = str(exc)
        assert text and len(text) < 2000 and "\n" not in text, text  # one line, not a dump of the input
        return None


def _reference(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """tensor name -> tensor, read by the safetensors library from the file each name is taken from."""
    out = {}
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as fh:
            out[name] = fh.get_tensor(name)
    return out


def _check(target: Path, root: Path, expected_files) -> None:
    """The property: refused, or read exactly as the reference reads it; inputs untouched."""
    before = _hashes(root)
    with time_limit(SECONDS_PER_EXAMPLE):
        got = _read_all(target)
    assert _hashes(root) == before, "an input file changed"
    if currently_in_test_context():
        event("refused" if got is None else "read")  # shown by --hypothesis-show-statistics
    if got is None:
        return
    try:
        want = _reference(expected_files(got))
    except Exception as exc:  # the reference refuses what we accepted: we were too lenient
        raise AssertionError(f"mergelab read {target} but safetensors refuses it: {exc}") from exc
    assert list(got) == list(want) or set(got) == set(want)
    for name, tensor in got.items():
        assert tensor.dtype == want[name].dtype and tensor.shape == want[name].shape, name
        assert torch.equal(_bits(tensor), _bits(want[name])), name


# -- mutated safetensors files ------------------------------------------------------------------

BASE_TENSORS = {"model.layers.0.weight": torch.arange(24, dtype=torch.float32).reshape(4, 6),
                "model.layers.1.bias": torch.arange(5, dtype=torch.bfloat16),
                "flag": torch.tensor([True, False, True]),
                "empty": torch.zeros(0, 3, dtype=torch.float16),
                "ids": torch.arange(7, dtype=torch.int64)}


def _valid_file(tmp: Path) -> bytes:
    save_file(BASE_TENSORS, tmp / "base.safetensors", metadata={"format": "pt"})
    return (tmp / "base.safetensors").read_bytes()


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("set-char"), st.integers(0, 10**6), st.sampled_from(b'{}[]":,0123456789-e. \\')),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
    st.tuples(st.just("length-delta"), st.integers(-16, 16), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 64), st.just(0)),
)


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    (hlen,) = struct.unpack("<Q", data[:8])
    header_end = 8 + hlen  # mutations aim at the length field and the header, where parsing happens
    for kind, where, value in ops:
        pos = where % max(1, min(len(buf), header_end))
        if kind == "set" and buf:
            buf[pos] = value
        elif kind == "set-char" and buf:
            buf[pos] = value
        elif kind == "insert":
            buf[pos:pos] = value
        elif kind == "delete":
            del buf[pos:pos + value]
        elif kind == "truncate":
            del buf[where % (len(buf) + 1):]
        elif kind == "length" and len(buf) >= 8:
            buf[:8] = struct.pack("<Q", where)
        elif kind == "length-delta" and len(buf) >= 8:
            buf[:8] = struct.pack("<Q", max(0, struct.unpack("<Q", bytes(buf[:8]))[0] + where))
        elif kind == "append":
            buf += b"\0" * where
    return bytes(buf)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_safetensors_files(tmp_path_factory, ops):
    tmp = tmp_path_factory.mktemp("st")
    path = tmp / "m.safetensors"
    path.write_bytes(_mutate(_valid_file(tmp), ops))
    (tmp / "base.safetensors").unlink()
    _check(path, tmp, lambda got: {name: path for name in got})


field_edit = st.tuples(
    st.integers(0, 4),  # which tensor (header order)
    st.sampled_from(["dtype", "shape", "begin", "end", "drop", "rename", "metadata"]),
    st.one_of(st.integers(-2, 200), st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "U8", "F64", "C64",
                                                      "flag", "", 1.5, None, [1, 2], {"a": 1}])),
)


@FUZZ
@given(edits=st.lists(field_edit, min_size=1, max_size=3), pad=st.integers(0, 3))
def test_structurally_mutated_headers(tmp_path_factory, edits, pad):
    """Valid JSON headers with edited fields (holes, overlaps, wrong shapes and dtypes), length kept right."""
    tmp = tmp_path_factory.mktemp("hdr")
    data = _valid_file(tmp)
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    names = [n for n in header if n != "__metadata__"]
    for which, field, value in edits:
        name = names[which % len(names)]
        if name not in header:
            continue
        info = header[name]
        if field == "dtype":
            info["dtype"] = value
        elif field == "shape":
            info["shape"] = [value] if isinstance(value, int) else value
        elif field in ("begin", "end"):
            info["data_offsets"][field == "end"] = value
        elif field == "drop":
            del header[name]
        elif field == "rename":
            header[f"{name}.x"] = header.pop(name)
        else:
            header["__metadata__"] = value if not isinstance(value, int) else {"n": value}
    body = json.dumps(header).encode() + b" " * pad
    path = tmp / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + hlen:])
    (tmp / "base.safetensors").unlink()
    _check(path, tmp, lambda got: {name: path for name in got})


@settings(FUZZ, max_examples=40)
@given(data=st.binary(max_size=300))
def test_random_bytes_as_safetensors(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("raw")
    (tmp / "x.safetensors").write_bytes(data)
    _check(tmp / "x.safetensors", tmp, lambda got: {n: tmp / "x.safetensors" for n in got})


# -- random and mutated index files -----------------------------------------------------------------

SHARDS = {"s1.safetensors": {"a": torch.ones(2, 3), "b": torch.arange(4.0)},
          "s2.safetensors": {"c": torch.zeros(5, dtype=torch.float16), "a": torch.full((2, 3), 7.0)}}

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
shard_name = st.one_of(st.sampled_from(["s1.safetensors", "s2.safetensors", "s3.safetensors", "../s1.safetensors",
                                        "/tmp/s1.safetensors", "sub/../s1.safetensors", "", ".", "s1.safetensors/",
                                        "S1.SAFETENSORS", "config.json", "model.safetensors.index.json"]),
                       json_value)
weight_map = st.dictionaries(st.sampled_from(["a", "b", "c", "d", ""]), shard_name, max_size=5)
index_doc = st.one_of(st.fixed_dictionaries({"weight_map": weight_map},
                                            optional={"metadata": json_value}), json_value)


def _index_folder(tmp: Path, index: bytes) -> Path:
    for fname, tensors in SHARDS.items():
        save_file(tensors, tmp / fname)
    (tmp / "config.json").write_text('{"num_hidden_layers": 1}')
    (tmp / "model.safetensors.index.json").write_bytes(index)
    return tmp


def _shard_of(tmp: Path):
    def files(got):
        weight_map = json.loads((tmp / "model.safetensors.index.json").read_bytes())["weight_map"]
        return {name: tmp / weight_map[name] for name in got}
    return files


@FUZZ
@given(doc=index_doc)
def test_random_index_files(tmp_path_factory, doc):
    tmp = _index_folder(tmp_path_factory.mktemp("idx"), json.dumps(doc).encode())
    _check(tmp, tmp, _shard_of(tmp))


@FUZZ
@given(ops=st.lists(st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 10**4),
                              st.sampled_from(b'{}[]":,. /\\ab12sx\xff')), min_size=1, max_size=4))
def test_mutated_index_files(tmp_path_factory, ops):
    buf = bytearray(json.dumps({"metadata": {"total_size": 60},
                                "weight_map": {"a": "s2.safetensors", "b": "s1.safetensors",
                                               "c": "s2.safetensors"}}).encode())
    for kind, where, value in ops:
        pos = where % (len(buf) + 1)
        if kind == "set" and pos < len(buf):
            buf[pos] = value
        elif kind == "insert":
            buf[pos:pos] = bytes([value])
        elif kind == "delete":
            del buf[pos:pos + 1 + value % 4]
    tmp = _index_folder(tmp_path_factory.mktemp("idxm"), bytes(buf))
    _check(tmp, tmp, _shard_of(tmp))


# -- random config files -------------------------------------------------------------------------------

config_doc = st.one_of(
    st.fixed_dictionaries({}, optional={"num_hidden_layers": json_value, "tie_word_embeddings": json_value,
                                        "text_config": json_value, "n_layer": json_value,
                                        "torch_dtype": json_value}),
    json_value)


@FUZZ
@given(doc=config_doc, raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_random_config_files(tmp_path_factory, doc, raw):
    tmp = tmp_path_factory.mktemp("cfg")
    save_file({"model.embed_tokens.weight": torch.ones(3, 2), "model.layers.0.w": torch.ones(2)},
              tmp / "model.safetensors")
    (tmp / "config.json").write_bytes(json.dumps(doc).encode() if raw is None else raw)
    _check(tmp, tmp, lambda got: {n: tmp / "model.safetensors" for n in got})
    try:
        ck = Checkpoint(tmp)
    except CheckpointError:
        return
    # accepted: parsed exactly as the json module does (compared as text: NaN != NaN)
    assert json.dumps(ck.config) == json.dumps(json.loads((tmp / "config.json").read_bytes()))


def test_the_property_itself_catches_a_wrong_read(tmp_path, monkeypatch):
    """The check is not vacuous: a reader giving other bytes than safetensors reads fails it."""
    save_file({"w": torch.arange(4.0)}, tmp_path / "x.safetensors")
    monkeypatch.setattr(sys.modules[__name__], "_read_all", lambda path: {"w": torch.zeros(4)})
    with pytest.raises(AssertionError, match="w"):
        _check(tmp_path / "x.safetensors", tmp_path, lambda got: {n: tmp_path / "x.safetensors" for n in got})


def test_the_time_limit_interrupts_a_hang():
    with pytest.raises(Hang):
        with time_limit(0.2):
            signal.pause()  # waits for a signal: forever, but for the alarm
