"""Tests of mergelab.checkpoint.reader: every tensor read back must equal what another tool wrote."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergelab.checkpoint.reader import DTYPES, Checkpoint, layer_index, parse_dtype, with_layer_index
from mergelab.errors import CheckpointError

from conftest import tiny_llama_config


class NotATensor:
    """A custom class: pickles holding it need unsafe unpickling."""

    def __init__(self) -> None:
        self.payload = 1


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality, also for dtypes (float8) whose == is not implemented."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _safetensors_dtypes() -> list[torch.dtype]:
    return list(dict.fromkeys(DTYPES.values()))


@pytest.mark.parametrize("dtype", _safetensors_dtypes(), ids=str)
def test_round_trip_of_save_file_is_exact(tmp_path, dtype):
    tensors = {"w": _sample(dtype, (5, 3)), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 4)),
               "v": _sample(dtype, (7,), seed=1)}
    save_file(tensors, tmp_path / "x.safetensors")
    with Checkpoint(tmp_path / "x.safetensors") as ck:
        assert set(ck) == set(tensors) and len(ck) == 4
        for name, t in tensors.items():
            assert _same(ck[name], t)
            assert ck.shape(name) == tuple(t.shape) and ck.dtype(name) == dtype
            assert ck.nbytes(name) == t.numel() * t.element_size()
        assert _same(ck.view("w", rows=(1, 4)), tensors["w"][1:4])
        assert ck.folder is None and ck.config is None


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=4),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64]),
                       min_size=4, max_size=4),
       rows=st.tuples(st.integers(0, 5), st.integers(0, 5)))
def test_reads_and_row_reads_equal_the_saved_tensors(tmp_path_factory, shapes, dtypes, rows):
    tensors = {f"t{i}": _sample(dtypes[i], tuple(s), seed=i) for i, s in enumerate(shapes)}
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    save_file(tensors, path)
    ck = Checkpoint(path)
    for name, t in tensors.items():
        assert _same(ck[name], t)
        if t.dim() >= 1:
            start, stop = sorted(min(r, t.shape[0]) for r in rows)
            assert _same(ck.view(name, rows=(start, stop)), t[start:stop])
    ck.close()


def test_each_read_is_a_new_tensor(tmp_path):
    save_file({"w": torch.ones(3)}, tmp_path / "x.safetensors")
    torch.save({"w": torch.ones(3)}, tmp_path / "x.bin")
    for path in ("x.safetensors", "x.bin"):
        ck = Checkpoint(tmp_path / path)
        first = ck["w"]
        first.mul_(5)
        assert torch.equal(ck["w"], torch.ones(3))


def test_contains_does_not_read(tmp_path, monkeypatch):
    save_file({"w": torch.ones(3)}, tmp_path / "x.safetensors")
    ck = Checkpoint(tmp_path / "x.safetensors")
    monkeypatch.setattr(os, "preadv", lambda *a: pytest.fail("membership test read the file"))
    assert "w" in ck and "v" not in ck and ck.get("v") is None


def test_sharded_hf_folder_reads_the_state_dict(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    sd = model.state_dict()
    with Checkpoint(tmp_path / "m") as ck:
        assert list(ck.keys()) == list(index["weight_map"])
        assert set(ck) == set(sd)
        for name in ck:
            assert torch.equal(ck[name], sd[name])
        assert ck.folder == tmp_path / "m" and ck.config["model_type"] == "llama"
        assert ck.num_layers == 4 and ck.tied_embeddings is False and ck.alias_for("lm_head.weight") is None
        assert ck.total_bytes == sum(t.numel() * t.element_size() for t in sd.values())
        assert "39 tensors" in ck.describe() and "float32 x39" in ck.describe()


def test_tied_model_aliases_lm_head_to_the_embedding(tmp_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "m")
    ck = Checkpoint(tmp_path / "m")
    assert "lm_head.weight" not in ck and ck.tied_embeddings
    alias = ck.alias_for("lm_head.weight")
    assert alias == "model.embed_tokens.weight"
    assert torch.equal(ck[alias], model.lm_head.weight.detach())
    assert ck.alias_for("model.norm.weight") is None


def test_tying_is_inferred_without_config(tmp_path):
    save_file({"transformer.wte.weight": torch.ones(4, 2), "transformer.h.2.mlp.weight": torch.ones(2)},
              tmp_path / "gpt.safetensors")
    save_file({"model.embed_tokens.weight": torch.ones(4, 2), "lm_head.weight": torch.ones(4, 2)},
              tmp_path / "untied.safetensors")
    gpt, untied = Checkpoint(tmp_path / "gpt.safetensors"), Checkpoint(tmp_path / "untied.safetensors")
    assert gpt.tied_embeddings and gpt.alias_for("lm_head.weight") == "transformer.wte.weight"
    assert gpt.num_layers == 3  # no config: 1 + largest block index
    assert not untied.tied_embeddings and untied.alias_for("lm_head.weight") is None
    assert untied.num_layers == 0


def test_torch_files_plain_wrapped_old_format_and_sharded(tmp_path):
    a, b = torch.randn(3, 2), torch.randn(4).to(torch.bfloat16)
    torch.save({"a": a, "b": b, "step": 7}, tmp_path / "plain.pt")
    torch.save({"state_dict": {"a": a, "b": b}, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"model": {"a": a, "b": b}}, tmp_path / "model.bin")
    torch.save({"a": a, "b": b}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    for name in ("plain.pt", "wrapped.pth", "model.bin", "old.bin"):
        ck = Checkpoint(tmp_path / name)
        assert list(ck) == ["a", "b"], name
        assert torch.equal(ck["a"], a) and torch.equal(ck["b"], b) and ck.dtype("b") == torch.bfloat16
        assert torch.equal(ck.view("a", rows=(1, 3)), a[1:3])
    assert Checkpoint(tmp_path / "plain.pt").skipped == ["step"]
    assert Checkpoint(tmp_path / "wrapped.pth").skipped == ["epoch"]

    folder = tmp_path / "bin_sharded"
    folder.mkdir()
    torch.save({"a": a}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": b}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "b": "pytorch_model-00002-of-00002.bin", "a": "pytorch_model-00001-of-00002.bin"}}))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    ck = Checkpoint(folder)
    assert list(ck) == ["b", "a"] and torch.equal(ck["a"], a) and ck.num_layers == 2


def test_pickle_needing_arbitrary_code_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "obj": NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match=r"evil\.bin.*unsafe.*safetensors"):
        Checkpoint(tmp_path / "evil.bin")


def test_truncated_safetensors_fails_at_open_naming_file_and_tensor(tmp_path):
    save_file({"first": torch.ones(8), "last": torch.ones(100)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*tensor last.*truncated or corrupt"):
        Checkpoint(tmp_path / "x.safetensors")


def _raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


@pytest.mark.parametrize("header, data, length, message", [
    (b"{}", b"", 10**12, "header length"),
    (b"not json", b"", None, "not valid JSON"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "needs 8"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "lacks"),
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype 'C64'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
      "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6, None, "overlap"),
    (b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {}}', b"\0", None, "duplicate"),
], ids=["length", "json", "size", "fields", "dtype", "negative", "overlap", "duplicate"])
def test_corrupt_headers_are_reported_at_open(tmp_path, header, data, length, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(path)
    assert "bad.safetensors" in str(info.value)


def test_missing_shard_is_reported_at_open(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-00002"):
        Checkpoint(tmp_path)


def test_index_listing_a_tensor_its_shard_lacks_is_reported(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="absent from their shard, first b"):
        Checkpoint(tmp_path)


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="local"):
        Checkpoint("some-org/some-model-that-is-not-here")
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*\.safetensors"):
        Checkpoint(tmp_path / "notes.txt")
    save_file({"a": torch.ones(1)}, tmp_path / "one.safetensors")
    lone = Checkpoint(tmp_path)  # exactly one .safetensors, no config
    assert lone.folder == tmp_path and lone.config is None and list(lone) == ["a"]
    save_file({"a": torch.ones(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="found 2 .safetensors files"):
        Checkpoint(tmp_path)


def test_reading_after_close_is_an_error_but_metadata_stays(tmp_path):
    save_file({"w": torch.ones(3)}, tmp_path / "x.safetensors")
    with Checkpoint(tmp_path / "x.safetensors") as ck:
        ck["w"]
    assert ck.shape("w") == (3,)
    with pytest.raises(CheckpointError, match="closed"):
        ck["w"]


@pytest.mark.parametrize("name, index", [
    ("model.layers.12.mlp.up_proj.weight", 12), ("transformer.h.3.attn.c_attn.weight", 3),
    ("encoder.layer.5.attention.self.query.weight", 5), ("gpt_neox.layers.0.mlp.dense_h_to_4h.bias", 0),
    ("model.layers.1.self_attn.q_proj.weight", 1), ("model.layers.10.self_attn.q_proj.weight", 10),
    ("blocks.7.norm.weight", 7), ("encoder.block.2.layer.1.DenseReluDense.wi.weight", 2),
    ("model.embed_tokens.weight", None), ("model.norm.weight", None), ("lm_head.weight", None),
    ("model.layers.weight", None), ("model.layers1.0.weight", None), ("model.h1.2.weight", None),
])
def test_layer_index(name, index):
    assert layer_index(name) == index


def test_with_layer_index_rewrites_only_the_block_number():
    assert with_layer_index("model.layers.1.mlp.layers.1.w", 10) == "model.layers.10.mlp.layers.1.w"
    assert with_layer_index("transformer.h.10.attn.weight", 2) == "transformer.h.2.attn.weight"
    with pytest.raises(ValueError, match="model.norm.weight"):
        with_layer_index("model.norm.weight", 1)


@settings(max_examples=25, deadline=None)
@given(prefix=st.sampled_from(["model.layers", "transformer.h", "encoder.layer", "blocks"]),
       old=st.integers(0, 200), new=st.integers(0, 200),
       tail=st.sampled_from(["mlp.up_proj.weight", "attn.10.bias", "ln.weight"]))
def test_with_layer_index_then_layer_index_round_trips(prefix, old, new, tail):
    name = f"{prefix}.{old}.{tail}"
    assert layer_index(name) == old
    renamed = with_layer_index(name, new)
    assert layer_index(renamed) == new and renamed.endswith(tail)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("BFloat16") is torch.bfloat16
    assert parse_dtype("half") is torch.float16 and parse_dtype("fp16") is torch.float16
    assert parse_dtype("float") is torch.float32 and parse_dtype("torch.float32") is torch.float32
    assert parse_dtype("float64") is torch.float64
    with pytest.raises(ValueError, match="fp8.*bfloat16"):
        parse_dtype("fp8")


def test_reading_a_big_tensor_leaves_no_memory_resident(tmp_path):
    """Peak memory of a read is the tensor itself (no mmap, no bytes copy), and it is freed after."""
    size = 96 * 2**20
    path = tmp_path / "big.safetensors"
    _raw_file(path, {"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}})
    os.truncate(path, path.stat().st_size + size)  # sparse: reads as zeros, costs no disk
    script = textwrap.dedent(f"""
        import resource
        from mergelab.checkpoint.reader import Checkpoint
        def rss(): return int(open("/proc/self/statm").read().split()[1]) * {os.sysconf("SC_PAGE_SIZE")}
        ck = Checkpoint({str(path)!r})
        before, peak0 = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = ck["w"]
        assert float(t[-1]) == 0.0
        during = rss()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del t
        print(before, during, rss(), peak - max(peak0, before))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    before, during, after, peak_growth = map(int, out.stdout.split())
    assert during - before >= 0.9 * size  # the tensor really is resident while held
    assert peak_growth < 1.2 * size       # and nothing else of its size was
    assert after - before < 0.1 * size    # and it is gone once dropped


def test_views_equal_reads_and_never_reach_the_file(tmp_path):
    import mmap

    tensors = {"a": _sample(torch.bfloat16, (7, 5), 1), "b": _sample(torch.float32, (6, 3), 2),
               "c": _sample(torch.int8, (3,), 3), "empty": torch.zeros(0, 4)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    with Checkpoint(path) as ck:
        for name, want in tensors.items():
            assert torch.equal(ck.view(name), want) and ck.view(name).dtype == want.dtype
        assert torch.equal(ck.view("a", (2, 5)), tensors["a"][2:5])
        ck.advise("a", mmap.MADV_WILLNEED)
        ck.advise("b", mmap.MADV_DONTNEED, (1, 4))  # dropped pages come back from the file
        assert torch.equal(ck.view("b"), tensors["b"])
        v = ck.view("b")
        v.fill_(0)  # a private mapping: the write stays in this process
        assert torch.equal(ck["b"], tensors["b"])
        with pytest.raises(ValueError, match="rows 3:9"):
            ck.view("c", (3, 9))
    assert path.read_bytes() == before
