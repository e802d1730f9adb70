"""Checkpoint reading refuses every damaged, crafted or changing input with one CheckpointError naming the file.

Each test builds the bad input by hand (or damages a file the safetensors
library wrote) and checks the message names the file (and tensor) at fault.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab.checkpoint.reader import Checkpoint, asset_file, is_peft_adapter, module_files, module_folders
from mergelab.checkpoint.safetensors_file import SafetensorsFile
from mergelab.errors import CheckpointError
from mergelab.jsonfile import parse_json, read_json_file

POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _raw(path: Path, header: dict | bytes, data: bytes) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _u8(begin: int, end: int) -> dict:
    return {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}


# -- safetensors data buffer -------------------------------------------------------------


@pytest.mark.parametrize("header, data, message", [
    ({"a": _u8(0, 4), "b": _u8(6, 10)}, b"\0" * 10, r"2 bytes after tensor a belong to no tensor \(a hole before tensor b\)"),
    ({"a": _u8(2, 6)}, b"\0" * 6, r"2 bytes at the start of the data buffer belong to no tensor"),
    ({"a": _u8(0, 4)}, b"\0" * 9, r"5 bytes after the last tensor \(a\) belong to no tensor"),
    ({}, b"\0" * 3, r"3 bytes after the header \(no tensors\)"),
    ({"a": _u8(0, 4), "b": _u8(2, 6)}, b"\0" * 6, r"tensors a and b overlap"),
    ({"a": _u8(0, 4), "b": _u8(4, 12)}, b"\0" * 8, r"tensor b ends at byte \d+ but the file has only"),
    ({"a": {"dtype": "F32", "shape": [0, 2**62, 4], "data_offsets": [0, 0]}}, b"", "impossibly large"),
    ({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4, "impossibly large"),
], ids=["hole", "hole-at-start", "trailing", "trailing-no-tensors", "overlap", "past-end", "huge-dims", "many-dims"])
def test_data_buffer_must_be_covered_exactly(tmp_path, header, data, message):
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(path)
    assert str(info.value).startswith(str(path)) and "re-download or re-save" in str(info.value)


def test_files_the_safetensors_library_wrote_are_still_read(tmp_path):
    tensors = {"big": torch.arange(12.0).reshape(3, 4), "half": torch.ones(3, dtype=torch.float16),
               "empty": torch.zeros(0, 5), "flag": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    with Checkpoint(tmp_path / "ok.safetensors") as ck:
        assert all(torch.equal(ck[n], t) for n, t in tensors.items())


# -- JSON: nesting, encoding, type -----------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


def _folder_with_index(folder: Path, index: bytes) -> Path:
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(index)
    return folder


@pytest.mark.parametrize("content, message", [
    (DEEP, "nests JSON values too deeply"),
    (b'{"weight_map": ' + b'{"x": ' * 200 + b'1' + b'}' * 201, "nests JSON values more than 64 deep"),
    (b'{"weight_map": {"a": "caf\xe9.safetensors"}}', r"not UTF-8 text \(byte 25 is 0xe9\)"),
    (b'["weight_map"]', r"is a JSON list, not an object"),
    (b'{"weight_map": {"a": "model-00001-of-00001.safetensors", "a": "x"}}', "duplicate key 'a'"),
    (b'{"weight_map": {"a": 3}}', r"maps tensor a to 3, not to a shard file name"),
    (b'{"weight_map": {"a": null}}', r"maps tensor a to None"),
    (b'{"weight_map": {"a": ["s.safetensors"]}}', r"maps tensor a to \['s.safetensors'\]"),
    (b'{"weight_map": ' + b"1" * 5000 + b"}", "not valid JSON"),
], ids=["deep", "deep-below-recursion-limit", "latin1", "list", "duplicate", "int", "null", "list-value", "huge-int"])
def test_bad_index_json_is_one_clear_error(tmp_path, content, message):
    folder = _folder_with_index(tmp_path / "m", content)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(folder)
    assert str(folder / "model.safetensors.index.json") in str(info.value)


@pytest.mark.parametrize("content, message", [
    (DEEP, "too deeply"), (b"\xff\xfe{}", "not UTF-8"), (b"[1, 2]", "JSON list, not an object"),
    (b'"text"', "JSON string, not an object"), (b"{", "not valid JSON")])
def test_bad_config_json_is_one_clear_error(tmp_path, content, message):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))


@pytest.mark.parametrize("header, message", [
    (DEEP, "too deeply"), (b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}", "more than 64 deep"),
    (b'{"a": "\xc3"}', "not UTF-8"), (b"[]", "JSON list, not an object"), (b"nul", "not valid JSON")],
    ids=["deep", "deep-below-limit", "utf8", "list", "syntax"])
def test_bad_safetensors_header_json_is_one_clear_error(tmp_path, header, message):
    path = _raw(tmp_path / "h.safetensors", header, b"")
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(path)
    assert str(info.value).startswith(str(path)) and "safetensors header" in str(info.value)


def test_read_json_file_limits_and_types(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(CheckpointError, match=r"big\.json: this stats file is 1203 bytes, more than the 1000"):
        read_json_file(big, "stats file", max_bytes=1000)
    assert read_json_file(big, "stats file", expect=list) == [0] * 601
    with pytest.raises(CheckpointError, match="does not exist"):
        read_json_file(tmp_path / "none.json", "config")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_json_file(tmp_path, "config")
    os.mkfifo(tmp_path / "fifo.json")  # reading it would block forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_json_file(tmp_path / "fifo.json", "trainer state")

    class StateError(CheckpointError):
        pass

    (tmp_path / "state.json").write_text("[]")
    with pytest.raises(StateError, match=r"state\.json: this trainer state is a JSON list, not an object .*; "
                                         r"write it again"):
        read_json_file(tmp_path / "state.json", "trainer state", expect=dict, error=StateError,
                       advice="write it again")
    assert parse_json(b'{"a": [1, {"b": null}]}', "x", "thing", max_depth=3) == {"a": [1, {"b": None}]}
    with pytest.raises(CheckpointError, match="more than 2 deep"):
        parse_json(b'{"a": [1, {"b": null}]}', "x", "thing", max_depth=2)


# -- index files: shards outside the folder, tensors twice ----------------------------------------


@pytest.mark.parametrize("shard, message", [
    ("../outside.safetensors", "climbs out of the folder with '..'"),
    ("sub/../../outside.safetensors", "climbs out of the folder with '..'"),
    ("..\\outside.safetensors", "climbs out of the folder with '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("C:\\weights\\x.safetensors", "is an absolute path"),
    ("", "is empty"),
    ("x\0.safetensors", "contains a NUL character"),
], ids=["dotdot", "dotdot-deep", "backslash", "absolute", "drive", "empty", "nul"])
def test_index_may_only_name_files_inside_its_folder(tmp_path, shard, message):
    save_file({"a": torch.ones(2)}, tmp_path / "outside.safetensors")
    folder = _folder_with_index(tmp_path / "m", json.dumps({"weight_map": {"a": shard}}).encode())
    with pytest.raises(CheckpointError, match=f"tensor a {message}") as info:
        Checkpoint(folder)
    assert "index.json: shard file name" in str(info.value)


def test_index_shard_that_is_a_link_out_of_the_folder_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "secret.safetensors")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model-1.safetensors").symlink_to(tmp_path / "secret.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard model-1\.safetensors leads outside the model folder \(to "
                                              r".*secret\.safetensors\)"):
        Checkpoint(folder)


def test_hugging_face_cache_snapshots_with_links_to_blobs_are_read(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, repo / "blobs" / "aaa")
    save_file({"b": torch.zeros(3)}, repo / "blobs" / "bbb")
    (repo / "blobs" / "iii").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors",
                                                                   "b": "model-2.safetensors"}}))
    for name, blob in (("model-1.safetensors", "aaa"), ("model-2.safetensors", "bbb"),
                       ("model.safetensors.index.json", "iii")):
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    with Checkpoint(snapshot) as ck:
        assert torch.equal(ck["a"], torch.ones(2)) and torch.equal(ck["b"], torch.zeros(3))
    (repo / "blobs" / "ppp").write_text("{}")
    (snapshot / "1_Pooling").mkdir()
    (snapshot / "1_Pooling" / "config.json").symlink_to(Path("../../../blobs/ppp"))
    assert module_files(snapshot) == ["1_Pooling/config.json"]


def test_tensor_stored_in_two_shards_is_refused(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.ones(1)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.zeros(2)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s2.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: tensor a is stored in two shards, s2\.safetensors "
                                              r"\(as the index says\) and s1\.safetensors"):
        Checkpoint(tmp_path)


def test_tensor_a_shard_holds_that_the_index_does_not_list_is_still_skipped(tmp_path):
    save_file({"a": torch.ones(2), "extra": torch.ones(1)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    ck = Checkpoint(tmp_path)
    assert list(ck) == ["a"] and ck.skipped == ["extra"]


def test_weight_files_that_are_not_regular_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(CheckpointError, match=r"pipe\.safetensors: is not a regular file"):
        Checkpoint(tmp_path / "pipe.safetensors")
    os.mkfifo(tmp_path / "pipe.bin")
    with pytest.raises(CheckpointError, match=r"pipe\.bin: is not a regular file"):
        Checkpoint(tmp_path / "pipe.bin")


# -- sentence-transformers module folders ----------------------------------------------------------


def _st_model(folder: Path) -> Path:
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "model.safetensors")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text("{}")
    return folder


def test_module_folders_and_files_of_a_normal_model(tmp_path):
    model = _st_model(tmp_path / "m")
    (model / "2_Dense").mkdir()  # found by its name, though modules.json does not list it
    (model / "2_Dense" / "model.safetensors").write_bytes(b"x")
    (model / "2_Dense" / "sub").mkdir()
    (model / "2_Dense" / "sub" / "a.txt").write_text("a")
    assert module_folders(model) == ["1_Pooling", "2_Dense"]
    assert module_files(model) == ["1_Pooling/config.json", "2_Dense/model.safetensors", "2_Dense/sub/a.txt"]


def test_module_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "home" / ".ssh"
    elsewhere.mkdir(parents=True)
    (elsewhere / "id_rsa").write_text("secret")
    model = _st_model(tmp_path / "m")
    (model / "2_Normalize").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=r"2_Normalize: this sentence-transformers module folder is a "
                                              r"symbolic link \(to .*\.ssh\)"):
        module_folders(model)


def test_module_folder_listed_only_in_modules_json_as_a_link_is_refused(tmp_path):
    model = _st_model(tmp_path / "m")
    (tmp_path / "outside").mkdir()
    (model / "pool").symlink_to(tmp_path / "outside")
    (model / "modules.json").write_text(json.dumps([{"path": "pool"}]))
    with pytest.raises(CheckpointError, match="symbolic link"):
        module_files(model)


@pytest.mark.parametrize("modules, message", [
    ([{"path": "../other"}], r"module path '\.\./other' climbs out"),
    ([{"path": "/etc"}], r"module path '/etc' is an absolute path"),
    ([{"path": 3}], r"entry 0 is not an object with a string \"path\""),
    ([5], r"entry 0 is not an object"),
    ({"path": "1_Pooling"}, r"is a JSON object, not a list"),
])
def test_bad_modules_json_is_refused(tmp_path, modules, message):
    model = _st_model(tmp_path / "m")
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match=message) as info:
        module_folders(model)
    assert str(model / "modules.json") in str(info.value)


@pytest.mark.parametrize("content, message", [(DEEP, "too deeply"), (b"[\xff]", "not UTF-8")])
def test_unreadable_modules_json_is_one_clear_error(tmp_path, content, message):
    model = _st_model(tmp_path / "m")
    (model / "modules.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"modules.json: this modules.json .*{message}.*fix it or remove it"):
        module_files(model)


def test_file_links_in_module_folders(tmp_path):
    model = _st_model(tmp_path / "m")
    (model / "notes.txt").write_text("inside")
    (model / "1_Pooling" / "inside.txt").symlink_to(model / "notes.txt")
    assert module_files(model) == ["1_Pooling/config.json", "1_Pooling/inside.txt"]
    (tmp_path / "secret").write_text("s")
    (model / "1_Pooling" / "z.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(CheckpointError, match=r"1_Pooling/z\.txt: a symbolic link leading outside the model "
                                              r"folder \(to .*secret\)"):
        module_files(model)
    (model / "1_Pooling" / "z.txt").unlink()
    (model / "1_Pooling" / "linked").symlink_to(tmp_path)
    with pytest.raises(CheckpointError, match="symbolic link to a folder"):
        module_files(model)
    (model / "1_Pooling" / "linked").unlink()
    os.mkfifo(model / "1_Pooling" / "pipe")
    with pytest.raises(CheckpointError, match=r"1_Pooling/pipe: not a regular file"):
        module_files(model)


def test_asset_files_that_lead_outside_or_are_not_files_are_refused(tmp_path):
    model = _st_model(tmp_path / "m")
    (model / "tokenizer_config.json").write_text("{}")
    assert asset_file(model, "tokenizer_config.json") == model / "tokenizer_config.json"
    assert asset_file(model, "tokenizer.json") is None
    (tmp_path / "token").write_text("hf_secret")
    (model / "tokenizer.json").symlink_to(tmp_path / "token")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: a symbolic link leading outside the model folder"):
        asset_file(model, "tokenizer.json")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(model / "tokenizer_config.json")  # inside: fine
    assert asset_file(model, "tokenizer.json") == model / "tokenizer.json"
    os.mkfifo(model / "vocab.txt")
    with pytest.raises(CheckpointError, match=r"vocab\.txt: not a regular file"):
        asset_file(model, "vocab.txt")
    (model / "merges.txt").symlink_to(model / "gone")
    with pytest.raises(CheckpointError, match=r"merges\.txt: not a regular file .*broken link"):
        asset_file(model, "merges.txt")


# -- PEFT adapters ---------------------------------------------------------------------------------


def _adapter(folder: Path, weights: str = "adapter_model.safetensors") -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "base_model_name_or_path": "org/base-7b"}))
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 8),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.ones(8, 2)}
    if weights.endswith(".safetensors"):
        save_file(tensors, folder / weights)
    else:
        torch.save(tensors, folder / weights)
    return folder


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "adapter_model.bin"])
def test_peft_adapter_folder_is_refused_with_what_to_do(tmp_path, weights):
    folder = _adapter(tmp_path / "lora", weights)
    assert is_peft_adapter(folder) and is_peft_adapter(folder / weights)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    text = str(info.value)
    assert text.startswith(f"{folder}: is a LoRA/PEFT adapter (it holds adapter_config.json)")
    assert "(its base model: org/base-7b)" in text and "A and B factors separately" in text
    assert "merge_and_unload" in text and "\n" not in text
    with pytest.raises(CheckpointError, match=f"is a LoRA/PEFT adapter \\(its name is {weights}\\)"):
        Checkpoint(folder / weights)


def test_lora_factors_under_another_name_are_refused(tmp_path):
    folder = _adapter(tmp_path / "lora")
    os.rename(folder / "adapter_model.safetensors", tmp_path / "renamed.safetensors")
    assert not is_peft_adapter(tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError, match=r"renamed\.safetensors: is a LoRA/PEFT adapter \(it stores LoRA "
                                              r"factors, e.g. tensor base_model\.model\.layers\.0\.q_proj\.lora_A"):
        Checkpoint(tmp_path / "renamed.safetensors")


def test_full_models_are_not_adapters(tmp_path):
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2),
               "model.lora_alpha_table": torch.ones(1)}, tmp_path / "model.safetensors")
    assert not is_peft_adapter(tmp_path) and not is_peft_adapter(tmp_path / "model.safetensors")
    assert len(Checkpoint(tmp_path)) == 2


# -- files that change while they are read ----------------------------------------------------------


def _two_tensor_file(path: Path) -> Path:
    save_file({"first": torch.arange(4096.0), "second": torch.arange(65536.0)}, path)
    return path


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_truncated_after_open_is_one_clear_error_on_every_path(tmp_path):
    path = _two_tensor_file(tmp_path / "x.safetensors")
    ck = Checkpoint(path)
    early = ck.view("first")  # mapped before the truncation
    ck.check_unchanged()
    _truncate(path)
    msg = r"x\.safetensors: file changed or was truncated while reading \(it was truncated from \d+ to \d+ bytes after"
    for attempt in (lambda: ck.check_unchanged(["second"]), lambda: ck.check_unchanged(),
                    lambda: ck.view("second"), lambda: ck.advise("second", POPULATE_READ),
                    lambda: ck["first"], lambda: ck.view("second", rows=(0, 1))):
        with pytest.raises(CheckpointError, match=msg):
            attempt()
    assert torch.equal(early[:10], torch.arange(10.0))  # the first page is still in the file


def test_modified_in_place_or_replaced_or_deleted_is_reported(tmp_path):
    path = _two_tensor_file(tmp_path / "x.safetensors")
    ck = Checkpoint(path)
    ck["first"]
    viewed = ck.view("second")  # a job's input, about to be merged
    with open(path, "r+b") as fh:  # same size, new bytes
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\0\0\0\0")
    os.utime(path, ns=(0, 1))  # a distinct modification time even on coarse-clock file systems
    assert float(viewed[-1]) == 0.0  # the view silently shows the new bytes: only a check can tell
    with pytest.raises(CheckpointError, match="it was modified after mergelab opened it"):
        ck.check_unchanged(["second"])  # what the engine calls after computing a job
    with pytest.raises(CheckpointError, match="it was modified after mergelab opened it"):
        ck["second"]
    ck2 = Checkpoint(path)
    os.replace(_two_tensor_file(tmp_path / "new.safetensors"), path)
    with pytest.raises(CheckpointError, match="it was replaced by another file"):
        ck2.check_unchanged(["first"])
    with pytest.raises(CheckpointError, match="it was replaced by another file"):
        ck2["first"]  # the descriptor is opened only now, on the new file: refused too
    ck3 = Checkpoint(path)
    path.unlink()
    with pytest.raises(CheckpointError, match="it was deleted"):
        ck3.check_unchanged()
    with pytest.raises(KeyError):
        ck3.check_unchanged(["nope"])


def test_torch_files_changing_after_open_are_reported(tmp_path):
    torch.save({"w": torch.arange(50000.0)}, tmp_path / "m.bin")
    ck = Checkpoint(tmp_path / "m.bin")
    ck.check_unchanged(["w"])
    _truncate(tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match=r"m\.bin: file changed or was truncated while reading"):
        ck.view("w")
    with pytest.raises(CheckpointError, match="truncated"):
        ck["w"]


def test_failing_populate_read_on_a_shrunk_file_is_the_truncation_error(tmp_path):
    path = _two_tensor_file(tmp_path / "x.safetensors")
    source = SafetensorsFile(path)
    mapping = source._mapping()  # mapped while whole
    source._mapping = lambda: mapping  # skip the check made before madvise: only its failure remains
    _truncate(path)
    if not source.advise("first", POPULATE_READ):
        pytest.skip("this kernel has no MADV_POPULATE_READ")
    with pytest.raises(CheckpointError, match="was truncated"):
        source.advise("second", POPULATE_READ)
    source.close()


CHILD = textwrap.dedent("""
    import mmap, sys
    from mergelab.checkpoint.reader import Checkpoint
    from mergelab.errors import CheckpointError

    path, mode = sys.argv[1], sys.argv[2]
    ck = Checkpoint(path)
    views = {}
    try:
        for i, name in enumerate(["first", "second"]):
            if mode == "unchecked":  # the remaining race: mapped first, touched after the truncation
                views = views or {n: ck.view(n) for n in ck}
            else:
                ck.check_unchanged([name])
                ck.advise(name, getattr(mmap, "MADV_POPULATE_READ", 22))
                views[name] = ck.view(name)
            if i == 0:
                print("ready", flush=True)
                sys.stdin.readline()
            print(name, float(views[name].sum()), flush=True)
    except CheckpointError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
""")


def _run_child(script: str, args: list[str], truncate: Path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # never wait forever for a stuck child
        assert ready and proc.stdout.readline().strip() == "ready", "the child did not get ready"
        _truncate(truncate)
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_reader_truncated_between_jobs_exits_with_the_clear_error(tmp_path):
    path = _two_tensor_file(tmp_path / "x.safetensors")
    result = _run_child(CHILD, [str(path), "checked"], path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(f"{path}: file changed or was truncated while reading")
    assert len(result.stderr.strip().splitlines()) == 1


def test_remaining_race_a_view_touched_after_truncation_is_sigbus(tmp_path):
    # Documents what no check can catch (see SafetensorsFile): pages mapped
    # before the truncation and touched after it kill the process.
    path = _two_tensor_file(tmp_path / "x.safetensors")
    result = _run_child(CHILD, [str(path), "unchecked"], path)
    assert result.returncode == -signal.SIGBUS, (result.returncode, result.stderr)


MERGE_CHILD = textwrap.dedent("""
    import sys
    import mergelab
    from mergelab.engine import inputs as engine_inputs
    from mergelab.errors import MergeError

    a, b, out = sys.argv[1:4]
    original, calls = engine_inputs.Reader.inputs, []

    def paused_inputs(self, job, rows):  # wait for the test to truncate b before the second job
        calls.append(job.name)
        if len(calls) == 2:
            print("ready", flush=True)
            sys.stdin.readline()
        return original(self, job, rows)

    engine_inputs.Reader.inputs = paused_inputs
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]}
    try:
        mergelab.merge(recipe, out)
    except MergeError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
""")


def test_merge_of_an_input_truncated_between_jobs_exits_with_the_clear_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({f"layers.{i}.weight": torch.full((64, 256), float(i)) for i in range(4)},
                  tmp_path / name / "model.safetensors")
    victim = tmp_path / "b" / "model.safetensors"
    result = _run_child(MERGE_CHILD, [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out")], victim)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert f"{victim}: file changed or was truncated while reading" in result.stderr
    assert not (tmp_path / "out").exists()


# -- values the fuzzers found accepted too leniently ------------------------------------------------


@pytest.mark.parametrize("metadata", [{"n": 0}, "", [1], {"a": None}])
def test_metadata_must_be_strings_as_the_format_says(tmp_path, metadata):
    path = _raw(tmp_path / "m.safetensors", {"__metadata__": metadata, "a": _u8(0, 2)}, b"\0\0")
    with pytest.raises(CheckpointError, match=r"m\.safetensors: __metadata__ is not a JSON object of strings"):
        Checkpoint(path)


@pytest.mark.parametrize("config, attribute, message", [
    ({"tie_word_embeddings": "false"}, "tied_embeddings", r"tie_word_embeddings is 'false', not true or false"),
    ({"tie_word_embeddings": 0}, "tied_embeddings", "tie_word_embeddings is '0'"),
    ({"num_hidden_layers": -2}, "num_layers", r"its layer count is '-2', not a non-negative integer"),
    ({"num_hidden_layers": "32"}, "num_layers", "its layer count is '32'"),
    ({"text_config": {"n_layer": 2.5}}, "num_layers", "its layer count is '2.5'"),
])
def test_config_values_of_the_wrong_type_are_refused_not_guessed(tmp_path, config, attribute, message):
    save_file({"model.embed_tokens.weight": torch.ones(3, 2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ck = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        getattr(ck, attribute)
    assert str(info.value).startswith(str(tmp_path / "config.json"))


@pytest.mark.parametrize("path, message", [
    ("", r"^an empty path \(an unset variable\?\) is not a checkpoint path"),
    ("a\0b", r"^'a\\x00b' \(it holds a NUL\) is not a checkpoint path"),
    ("x" * 5000, r"^x{300}: cannot be read \(File name too long: x{300}\); check the path"),
])
def test_impossible_paths_are_one_clear_error(path, message):
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(path)


def test_dangling_link_is_named_as_such(tmp_path):
    (tmp_path / "model").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match=r"model is a symbolic link to .*gone, which does not exist"):
        Checkpoint(tmp_path / "model")


def test_names_that_would_break_a_one_line_message_are_refused(tmp_path):
    path = _raw(tmp_path / "n.safetensors", {"a\nb": _u8(0, 2)}, b"\0\0")
    with pytest.raises(CheckpointError, match=r"tensor name 'a\\nb' holds control characters") as info:
        Checkpoint(path)
    assert "\n" not in str(info.value)
    long_name = "x" * 10_000
    path = _raw(tmp_path / "l.safetensors", {long_name: _u8(0, 2)}, b"\0\0\0")
    with pytest.raises(CheckpointError, match=r"x{200}\.\.\.\) belong to no tensor") as info:
        Checkpoint(path)
    assert len(str(info.value)) < 500
    folder = _folder_with_index(tmp_path / "m", json.dumps({"weight_map": {"a\rb": "s.safetensors"}}).encode())
    with pytest.raises(CheckpointError, match=r"tensor name 'a\\rb' holds control characters"):
        Checkpoint(folder)
    torch.save({"w\x1b[31m": torch.ones(1)}, tmp_path / "esc.bin")
    with pytest.raises(CheckpointError, match=r"esc\.bin: key 'w\\x1b\[31m' holds control characters"):
        Checkpoint(tmp_path / "esc.bin")


def test_torch_load_errors_are_one_line(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "whole.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "whole.bin").read_bytes()[:700])
    (tmp_path / "zip.bin").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x02cos\nsystem\nq\x00.")  # a global torch refuses to load
    for name in ("cut.bin", "zip.bin", "pickle.bin"):
        with pytest.raises(CheckpointError) as info:
            Checkpoint(tmp_path / name)
        text = str(info.value)
        assert "\n" not in text and len(text) < 600 and text.startswith(str(tmp_path / name)), text
