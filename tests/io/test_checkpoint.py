"""Checkpoint reading: single files, plain folders, sharded folders, and every way they break."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from linquant.errors import FormatError, LinquantError
from linquant.io.checkpoint import (
    INDEX_NAME,
    checkpoint_files,
    iter_safetensors,
    read_tensors,
    tensor_infos,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(8, 16, generator=g),
        "a.weight": torch.randn(4, 32, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(4, generator=g),
        "ids": torch.arange(10, dtype=torch.int64).view(1, 10),
    }


def _shard(folder: Path, tensors: dict[str, torch.Tensor], split: dict[str, list[str]]) -> None:
    weight_map = {}
    for file, names in split.items():
        save_file({n: tensors[n] for n in names}, str(folder / file))
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index))


SPLIT = {
    "model-00001-of-00002.safetensors": ["b.weight", "ids"],
    "model-00002-of-00002.safetensors": ["a.weight", "a.bias"],
}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


def test_single_file_headers_and_data(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    infos = {i.name: i for i in tensor_infos(path)}
    assert set(infos) == set(tensors)
    for name, t in tensors.items():
        info = infos[name]
        assert info.shape == tuple(t.shape)
        assert info.numel == t.numel()
        assert info.nbytes == t.numel() * t.element_size()
        assert info.torch_dtype == t.dtype
        assert info.file == path
    assert infos["a.weight"].dtype == "BF16" and infos["a.weight"].is_floating_point
    assert infos["ids"].dtype == "I64" and not infos["ids"].is_floating_point
    _assert_same(dict(iter_safetensors(path)), tensors)


def test_infos_come_in_storage_order(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    offsets = [i.offset for i in tensor_infos(path)]
    assert offsets == sorted(offsets)
    assert [n for n, _ in iter_safetensors(path)] == [i.name for i in tensor_infos(path)]


def test_folder_without_index_reads_every_file(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file({"b.weight": tensors["b.weight"]}, str(tmp_path / "x.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "b.weight"},
              str(tmp_path / "y.safetensors"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in checkpoint_files(tmp_path)] == ["x.safetensors", "y.safetensors"]
    _assert_same(dict(iter_safetensors(tmp_path)), tensors)


def test_sharded_folder_follows_the_index(tmp_path: Path) -> None:
    tensors = _tensors()
    _shard(tmp_path, tensors, SPLIT)
    assert [p.name for p in checkpoint_files(tmp_path)] == sorted(SPLIT)
    _assert_same(dict(iter_safetensors(tmp_path)), tensors)
    # the index file itself is a valid source too
    _assert_same(dict(iter_safetensors(tmp_path / INDEX_NAME)), tensors)


def test_sharded_index_is_authoritative(tmp_path: Path) -> None:
    tensors = _tensors()
    _shard(tmp_path, tensors, SPLIT)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    del index["weight_map"]["a.bias"]  # still in the shard, no longer in the index
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    assert "a.bias" not in {i.name for i in tensor_infos(tmp_path)}


def test_names_filter(tmp_path: Path) -> None:
    tensors = _tensors()
    _shard(tmp_path, tensors, SPLIT)
    got = dict(iter_safetensors(tmp_path, names=["a.weight", "ids"]))
    _assert_same(got, {k: tensors[k] for k in ("a.weight", "ids")})
    with pytest.raises(LinquantError, match="no tensor named 'nope'"):
        iter_safetensors(tmp_path, names=["nope"])


def test_read_tensors_is_lazy(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    it = read_tensors(tensor_infos(path))
    name, tensor = next(it)
    assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
    it.close()  # closing part way releases the file


# ---- bad sources -------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LinquantError, match=r"nope\.safetensors: no such file or folder"):
        tensor_infos(missing)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(LinquantError, match=r"no \.safetensors files"):
        tensor_infos(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x01\x02", struct.pack("<Q", 10**9) + b"{}", struct.pack("<Q", 4) + b"nope",
     struct.pack("<Q", 2) + b"[]"],
    ids=["empty", "short", "huge-header-length", "not-json", "not-an-object"],
)
def test_not_a_safetensors_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=r"bad\.safetensors: not a safetensors file"):
        tensor_infos(path)


def test_malformed_header_entry(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 8]}})
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    with pytest.raises(FormatError, match="tensor 'w' has a malformed header entry"):
        tensor_infos(path)


def test_a_file_cut_short_says_so(tmp_path: Path) -> None:
    """Its last tensor ends past the end of the data: that was "a malformed header entry"."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 999]}})
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    with pytest.raises(FormatError, match=r"bad.safetensors: the file is cut short "
                                          r"\(truncated\?\): tensor 'w' ends at data byte 999, "
                                          r"the file holds 16 bytes of data"):
        tensor_infos(path)


def test_shard_missing_from_folder(tmp_path: Path) -> None:
    _shard(tmp_path, _tensors(), SPLIT)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match=r"shard model-00002-of-00002\.safetensors"):
        tensor_infos(tmp_path)


def test_index_names_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    _shard(tmp_path, _tensors(), SPLIT)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FormatError, match="holds 'ghost', but it does not"):
        tensor_infos(tmp_path)


@pytest.mark.parametrize(
    "index",
    ["{", "[]", '{"weight_map": {}}', '{"weight_map": {"w": "../x.safetensors"}}'],
    ids=["not-json", "not-an-object", "empty-map", "escapes-folder"],
)
def test_bad_index(tmp_path: Path, index: str) -> None:
    (tmp_path / INDEX_NAME).write_text(index)
    with pytest.raises(FormatError, match=INDEX_NAME.replace(".", r"\.")):
        tensor_infos(tmp_path)


def test_same_name_in_two_files_is_an_error(tmp_path: Path) -> None:
    w = torch.zeros(2, 2)
    save_file({"w": w}, str(tmp_path / "x.safetensors"))
    save_file({"w": w}, str(tmp_path / "y.safetensors"))
    with pytest.raises(FormatError, match="tensor 'w' is in both"):
        tensor_infos(tmp_path)


def test_several_indexes_without_the_standard_one(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(LinquantError, match="several sharded indexes"):
        tensor_infos(tmp_path)
