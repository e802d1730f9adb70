"""Tests of mergelab.checkpoint.writer: outputs are checked with safetensors and transformers themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mergelab.checkpoint.reader import Checkpoint
from mergelab.checkpoint.safetensors_format import parse_header
from mergelab.checkpoint.writer import CheckpointWriter, TensorInfo, copy_assets, parse_size, plan_shards
from mergelab.errors import OutputError, CheckpointError, ShapeMismatch

from conftest import tiny_llama_config


def _layout(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _read_back(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, read by the safetensors library (the reference reader)."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(7, 3, generator=g).to(torch.bfloat16),     # 42 bytes: misaligns what follows
        "w": torch.randn(4, 5, generator=g),
        "ids": torch.arange(6, dtype=torch.int64),
        "half": torch.randn(3, generator=g).to(torch.float16),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _write_all(out: Path, tensors: dict[str, torch.Tensor], shard_size: int, order=None, **finish) -> Path:
    with CheckpointWriter(out, _layout(tensors), shard_size=shard_size) as w:
        for name in order or tensors:
            w.write(name, tensors[name])
        return w.finish(**finish)


@pytest.mark.parametrize("shard_size", [10**9, 48])
def test_shuffled_writes_read_back_exactly(tmp_path, shard_size):
    tensors = _mixed()
    order = list(tensors)
    random.Random(1).shuffle(order)
    out = _write_all(tmp_path / "out", tensors, shard_size, order)
    got = _read_back(out)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert list(Checkpoint(out)) == list(tensors)  # layout order is the order readers list
    for shard in out.glob("*.safetensors"):  # each tensor aligned to its element size
        entries, metadata = parse_header(shard)
        assert metadata == {"format": "pt"}
        assert all(e.begin % e.dtype.itemsize == 0 for e in entries)


def test_sharding_splits_greedily_and_index_is_correct(tmp_path):
    # sizes 40, 40, 40, 100, 8 with shard_size 100, worked by hand:
    # [40, 40] (a third 40 would make 120), [40] (+100 too big), [100] (exactly full), [8]
    tensors = {"a": torch.zeros(10), "b": torch.ones(10), "c": torch.full((10,), 2.0),
               "d": torch.arange(25, dtype=torch.float32), "e": torch.ones(2, dtype=torch.int32)}
    out = _write_all(tmp_path / "out", tensors, 100)
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "d": names[2], "e": names[3]}
    assert index["metadata"]["total_size"] == 40 * 3 + 100 + 8
    assert sorted(p.name for p in out.glob("*.safetensors")) == names
    for name in names:
        with safe_open(out / name, framework="pt") as f:
            assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in f.keys())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    out = _write_all(tmp_path / "out", {"w": torch.ones(3)}, 10**9)
    assert sorted(p.name for p in out.iterdir()) == [".mergelab-output", "model.safetensors"]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=12), shard_size=st.integers(1, 60))
def test_shard_plan_invariants(sizes, shard_size):
    layout = [TensorInfo(f"t{i}", (n,), torch.uint8) for i, n in enumerate(sizes)]
    shards = plan_shards(layout, shard_size)
    assert [i for s in shards for i in s] == layout  # every tensor once, in layout order
    for i, shard in enumerate(shards):
        total = sum(t.nbytes for t in shard)
        assert len(shard) == 1 or total <= shard_size
        if i + 1 < len(shards):  # greedy: the next shard's first tensor did not fit
            assert total + shards[i + 1][0].nbytes > shard_size


def test_row_blocks_in_any_order_equal_the_whole(tmp_path):
    w = torch.randn(10, 3).to(torch.bfloat16)
    with CheckpointWriter(tmp_path / "out", [TensorInfo("w", (10, 3), torch.bfloat16)], shard_size=10**9) as wr:
        for start, stop in [(6, 10), (0, 3), (3, 6)]:
            wr.write_rows("w", start, w[start:stop])
            assert wr.bytes_written("w") > 0
        assert wr.bytes_written("w") == w.numel() * 2
        with pytest.raises(CheckpointError, match="overlap"):
            wr.write_rows("w", 2, w[2:4])
        wr.finish()
    assert torch.equal(_read_back(tmp_path / "out")["w"], w)


def test_non_contiguous_input_is_written_in_logical_order(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # (4, 3), transposed strides
    out = _write_all(tmp_path / "out", {"t": t}, 10**9)
    assert torch.equal(_read_back(out)["t"], t.contiguous())


def test_wrong_tensors_are_refused(tmp_path):
    layout = [TensorInfo("w", (2, 3), torch.float32)]
    with CheckpointWriter(tmp_path / "out", layout, shard_size=10**9) as w:
        with pytest.raises(ShapeMismatch, match=r"w.*\(3, 2\).*\(2, 3\)"):
            w.write("w", torch.zeros(3, 2))
        with pytest.raises(CheckpointError, match="w.*bfloat16.*cast"):
            w.write("w", torch.zeros(2, 3, dtype=torch.bfloat16))
        with pytest.raises(CheckpointError, match="not in the output layout"):
            w.write("v", torch.zeros(2, 3))
        w.write("w", torch.zeros(2, 3))
        with pytest.raises(CheckpointError, match="overlap"):
            w.write("w", torch.zeros(2, 3))
        w.finish()
    with pytest.raises(CheckpointError, match="twice"):
        CheckpointWriter(tmp_path / "o2", layout * 2, shard_size=10)
    assert not (tmp_path / "o2").exists()


def test_finishing_with_a_missing_tensor_errors_and_leaves_nothing(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.ones(4, 2)}
    with pytest.raises(CheckpointError, match=r"not fully written: b"):
        with CheckpointWriter(tmp_path / "out", _layout(tensors), shard_size=10**9) as w:
            w.write("a", tensors["a"])
            w.write_rows("b", 0, tensors["b"][:2])  # half of b
            w.finish()
    assert list(tmp_path.iterdir()) == []


def test_exception_midway_leaves_no_output_and_no_partial_folder(tmp_path):
    tensors = _mixed()
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", _layout(tensors), shard_size=48) as w:
            assert w.temp.parent == tmp_path and w.temp.name.startswith(".out.partial-")
            w.write("w", tensors["w"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    w.abort()  # idempotent


def test_existing_output_needs_overwrite_and_is_replaced_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    layout = [TensorInfo("w", (2,), torch.float32)]
    with pytest.raises(OutputError, match="did not write"):  # not mergelab's folder: never replaced
        CheckpointWriter(out, layout, shard_size=10, overwrite=True)
    (out / ".mergelab-output").write_text("")
    with pytest.raises(OutputError, match=r"already exists.*\(overwrite=True\)") as exc:
        CheckpointWriter(out, layout, shard_size=10)
    assert exc.value.option == "overwrite"
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old folder as it was
        with CheckpointWriter(out, layout, shard_size=10, overwrite=True):
            raise RuntimeError("fail before finish")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").exists()
    with CheckpointWriter(out, layout, shard_size=10, overwrite=True) as w:
        w.write("w", torch.ones(2))
        w.finish()
    assert sorted(p.name for p in out.iterdir()) == [".mergelab-output", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old- or .partial- left


@pytest.mark.parametrize("where", ["inside", "same", "contains"])
def test_refuses_to_write_where_an_input_lives(tmp_path, where):
    model = tmp_path / "models" / "in"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"x")
    out = {"inside": model / "merged", "same": model, "contains": tmp_path / "models"}[where]
    with pytest.raises(OutputError, match="refusing to use .* as the output folder: it (is|lies inside|contains) the input"):
        CheckpointWriter(out, [], shard_size=10, overwrite=True, protected=[model])
    assert (model / "model.safetensors").read_bytes() == b"x" and not (model / "merged").exists()


def test_lone_file_input_is_protected_too(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match="refusing"):
        CheckpointWriter(tmp_path, [], shard_size=10, overwrite=True, protected=[tmp_path / "x.safetensors"])


def _asset_folder(root: Path) -> Path:
    src = root / "src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "2_Dense").mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4,
                                                 "dtype": "float32", "vocab_size": 96}))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.txt",
                 "chat_template.jinja", "sentence_bert_config.json", "model.safetensors", "pytorch_model.bin",
                 "optimizer.pt", "notes.md"):
        (src / name).write_text(name)
    (src / "modules.json").write_text(json.dumps([{"idx": 0, "path": ""}, {"idx": 1, "path": "1_Pooling"},
                                                  {"idx": 2, "path": "2_Dense"}]))
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "2_Dense" / "config.json").write_text("{}")
    (src / "2_Dense" / "model.safetensors").write_text("weights")
    return src


def test_assets_are_copied_config_updated_and_weights_never(tmp_path):
    src = _asset_folder(tmp_path)
    with CheckpointWriter(tmp_path / "out", [TensorInfo("w", (1,), torch.float32)], shard_size=10) as w:
        w.write("w", torch.ones(1))
        out = w.finish(assets_from=src, config_updates={"num_hidden_layers": 6, "torch_dtype": "bfloat16"},
                       extra_files={"README.md": "# merged\n", "sub/recipe.bin": b"\x00\x01"})
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != ".mergelab-output")
    assert files == ["1_Pooling/config.json", "2_Dense/config.json", "README.md", "chat_template.jinja",
                     "config.json", "generation_config.json", "model.safetensors", "modules.json",
                     "sentence_bert_config.json", "sub/recipe.bin", "tokenizer.json", "tokenizer_config.json",
                     "vocab.txt"]
    assert (out / "model.safetensors").read_bytes() != (src / "model.safetensors").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_type": "llama", "num_hidden_layers": 6, "dtype": "bfloat16",
                      "torch_dtype": "bfloat16", "vocab_size": 96}
    assert (out / "README.md").read_text() == "# merged\n" and (out / "sub/recipe.bin").read_bytes() == b"\x00\x01"
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert w.skipped_assets == ["2_Dense/model.safetensors"]


def test_extra_files_cannot_escape_or_replace_weights(tmp_path):
    for bad in ("../escape.txt", "model.safetensors"):
        with pytest.raises(CheckpointError, match="extra file"):
            with CheckpointWriter(tmp_path / "out", [], shard_size=10) as w:
                w.finish(extra_files={bad: "x"})
        assert list(tmp_path.iterdir()) == []


def test_transformers_loads_a_llama_written_through_the_writer(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(tmp_path / "src")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    order = list(sd)
    random.Random(0).shuffle(order)
    out = _write_all(tmp_path / "out", sd, 30_000, order, assets_from=tmp_path / "src")
    assert (out / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("text, size", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1e9", 10**9), (1234, 1234),
    ("1.5 GB", 1_500_000_000), ("40kb", 40_000), ("100", 100), ("3MiB", 3 * 2**20),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5 parsecs", "", "GB", "-1GB", 0, "0", "1e-9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
def test_copy_assets_never_follows_links_out_of_the_model_folder(tmp_path):
    src, secret = tmp_path / "src", tmp_path / "home"
    (src / "1_Pooling").mkdir(parents=True)
    secret.mkdir()
    (secret / "token").write_text("hf_secret")
    (src / "config.json").write_text("{}")
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "2_Normalize").symlink_to(secret)
    with pytest.raises(CheckpointError, match="2_Normalize: this sentence-transformers module folder is a symbolic link"):
        copy_assets(src, tmp_path / "out1", {})
    (src / "2_Normalize").unlink()
    (src / "tokenizer.json").symlink_to(secret / "token")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: a symbolic link leading outside the model folder"):
        copy_assets(src, tmp_path / "out2", {})
    (src / "tokenizer.json").unlink()
    (src / "config.json").write_bytes(b"[" * 100000 + b"]" * 100000)
    with pytest.raises(CheckpointError, match=r"config\.json: this config nests JSON values too deeply"):
        copy_assets(src, tmp_path / "out3", {})
    (src / "config.json").write_text("{}")
    (tmp_path / "out4").mkdir()
    assert copy_assets(src, tmp_path / "out4", {}) == []
    assert (tmp_path / "out4" / "1_Pooling" / "config.json").read_text() == "{}"
