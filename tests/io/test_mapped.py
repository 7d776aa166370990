"""Codes loaded as views of the mapped checkpoint: held once at run time, never lost or changed."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from linquant.convert import quantize_model
from linquant.io import mapped
from linquant.io.save import load, load_into, save
from linquant.nn import QuantLinear, QuantModule, W8A8Linear

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="releases pages with madvise and reads /proc/self/smaps")
PAGE = 4096


class Net(nn.Module):
    """Weights of several pages each: a W8A8 layer, a weight-only one, a tied embedding/head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 256)
        self.up = nn.Linear(256, 1024)
        self.down = nn.Linear(1024, 256)
        self.head = nn.Linear(256, 300, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.down(torch.relu(self.up(self.emb(ids)))))
        return out


IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
RULES = {"up": "w8a8", "*": "w4a16-g32"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = Net().eval()
    quantize_model(m, RULES)
    out = tmp_path / "q"
    save(m, out)
    return out


def _loaded(folder: Path, mmap: bool = True) -> Net:
    m = Net()
    load_into(m, folder, mmap=mmap)
    return m.eval()


def _codes(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: mod._buffers["weight_qdata"] for n, mod in m.named_modules()
            if isinstance(mod, QuantModule)}


def test_loaded_codes_are_views_of_the_file_unless_mmap_is_off(folder: Path) -> None:
    m = _loaded(folder)
    assert isinstance(m.up, W8A8Linear) and isinstance(m.down, QuantLinear)
    assert all(mapped.is_mapped(t) for t in _codes(m).values())
    assert not any(mapped.is_mapped(t) for t in _codes(_loaded(folder, mmap=False)).values())
    assert mapped.is_mapped(m.down.weight_zero_point)  # uint8, like the codes
    # scales and offsets too, where their offset in the file suits their dtype
    assert any(mapped.is_mapped(mod.weight_scale) for mod in (m.up, m.down, m.emb))
    assert not mapped.is_mapped(m.up.bias) and not mapped.is_mapped(m.down.bias)  # read


def test_mapped_and_read_models_are_bit_identical_before_and_after_release(folder: Path
                                                                           ) -> None:
    a, b = _loaded(folder), _loaded(folder, mmap=False)
    with torch.inference_mode():
        for x in (IDS, IDS[:1, :1], torch.randint(0, 300, (1, 300))):  # many tokens: scratch
            assert torch.equal(a(x), b(x))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb), na


def _map(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    with open(path, "rb") as f:
        return mapped.map_tensor(f.fileno(), offset, nbytes)


def _pages(offset: int, nbytes: int) -> int:
    """Bytes of the whole pages from the one holding ``offset`` to the one holding the end."""
    return -(-(offset % PAGE + nbytes) // PAGE) * PAGE


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    data = torch.randint(0, 256, (24 * PAGE,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("blob") / "f"
    path.write_bytes(data.numpy().tobytes())
    return path, data


@linux_only
def test_release_drops_the_pages_and_the_file_gives_the_same_bytes_back(
        blob: tuple[Path, torch.Tensor]) -> None:
    path, data = blob
    t = _map(path, 100, 20 * PAGE)  # not page aligned: its mapping starts at the file's page 0
    assert torch.equal(t, data[100:100 + 20 * PAGE])  # reading makes the pages resident
    before = mapped.mapped_rss([t])
    assert before is not None and before >= 20 * PAGE
    assert mapped.release(t) == 21 * PAGE
    assert mapped.mapped_rss([t]) == 0
    assert torch.equal(t, data[100:100 + 20 * PAGE])
    assert mapped.release(data) == 0  # not a mapped tensor


@linux_only
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 24 * PAGE - 1), st.integers(1, 24 * PAGE))
def test_a_mapped_tensor_has_its_bytes_and_a_storage_of_its_own(
        blob: tuple[Path, torch.Tensor], start: int, size: int) -> None:
    path, data = blob
    size = min(size, 24 * PAGE - start)
    t = _map(path, start, size)
    assert torch.equal(t, data[start:start + size])
    assert t.untyped_storage().nbytes() == size and t.untyped_storage().data_ptr() == t.data_ptr()
    assert mapped.release(t) == _pages(start, size)
    assert torch.equal(t, data[start:start + size])  # read back from the file


@linux_only
def test_a_tensor_written_in_place_is_never_released(blob: tuple[Path, torch.Tensor]) -> None:
    a, b = _map(blob[0], 0, 8 * PAGE), _map(blob[0], 8 * PAGE, 8 * PAGE)
    a.view(torch.int8)[5] = 7  # a private copy of that page now: dropping it would lose the write
    assert mapped.release(a) == 0 and int(a[5]) == 7
    assert mapped.release(b) == 8 * PAGE  # another tensor of the same file: its own mapping


@linux_only
def test_only_tensors_a_layout_holds_are_dropped_again_after_a_whole_weight_read(
        blob: tuple[Path, torch.Tensor]) -> None:
    a, b = _map(blob[0], 0, 8 * PAGE), _map(blob[0], 8 * PAGE, 8 * PAGE)
    a.sum(), b.sum()
    assert mapped.release_if_held(a) == 0  # the one copy in use: stays
    assert mapped.held_by_layout(b) == 8 * PAGE
    b.sum()  # a whole-weight read brings the pages back...
    assert mapped.release_if_held(b) == 8 * PAGE  # ...and they go again
    assert mapped.held_by_layout(torch.zeros(PAGE, dtype=torch.uint8)) == 0  # not mapped
    start = b.data_ptr()
    assert start in mapped._maps
    del a, b
    gc.collect()
    assert start not in mapped._maps  # unmapped with the last view


def test_torch_save_of_a_loaded_model(folder: Path, tmp_path: Path) -> None:
    """Codes (uint8, and int8 views in W8A8 layers) and scales have storages of their own, so
    ``torch.save`` takes the state dict and the model (it refuses storages viewed as two
    dtypes) and writes only their bytes."""
    m = _loaded(folder)
    with torch.inference_mode():
        y = m(IDS)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    torch.save(m, tmp_path / "model.pt")
    sd = torch.load(tmp_path / "sd.pt")
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v), k
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.inference_mode():
        assert torch.equal(again(IDS), y)
    assert (tmp_path / "sd.pt").stat().st_size < 1.5 * (folder / "model.safetensors").stat().st_size


@linux_only
def test_loading_leaves_the_codes_in_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = Net()
    quantize_model(m, "w4a16-sym-g32")  # symmetric: loading reads every code to check its range
    save(m, tmp_path / "q")
    loaded = _loaded(tmp_path / "q")
    parts = [t for mod in loaded.modules() if isinstance(mod, QuantModule)
             for t in mod.qweight.tensors().values()]
    assert all(mapped.is_mapped(t) for t in parts)
    assert mapped.mapped_rss(parts) == 0


@linux_only
@pytest.mark.parametrize("inference", [False, True], ids=["loaded", "loaded_in_inference_mode"])
def test_a_layer_that_builds_a_layout_releases_its_mapped_codes(folder: Path,
                                                                inference: bool) -> None:
    # loaded inside torch.inference_mode, the codes were inference tensors (dtype views made
    # there are), which keep no version counter: nothing could say they were never written, so
    # their pages were never released and such a model held its codes twice
    with torch.inference_mode(inference):
        m = _loaded(folder)
    codes = _codes(m)
    assert not any(t.is_inference() for t in codes.values())
    for t in codes.values():  # make every page resident again
        t.sum()
    before = mapped.mapped_rss()
    with torch.inference_mode():
        m.up(torch.randn(16, 256))  # W8A8 at 16 tokens: an int8 layout (native, fbgemm, oneDNN)
    after = mapped.mapped_rss()
    assert before is not None and after is not None
    assert before - after >= (codes["up"].numel() // PAGE - 1) * PAGE


def test_load_state_dict_into_mapped_codes_keeps_the_new_values(folder: Path) -> None:
    m, other = _loaded(folder), Net()
    torch.manual_seed(5)
    quantize_model(other, RULES)
    m.load_state_dict(other.state_dict())  # in place, into the mapped codes
    with torch.inference_mode():
        m(IDS)  # layouts built: nothing may be dropped now
        assert torch.equal(m(IDS), other.eval()(IDS))
    for k, v in other.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_saving_over_the_folder_a_model_was_loaded_from(folder: Path) -> None:
    m = load_into(Net(), folder).eval()
    with torch.inference_mode():
        y = m(IDS)  # layouts built, mapped codes released
    save(m, folder, overwrite=True)  # staged, then renamed: the mapped files stay intact
    again = _loaded(folder)
    with torch.inference_mode():
        assert torch.equal(again(IDS), y)
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.model
def test_load_of_a_transformers_folder_maps_its_codes(tmp_path: Path) -> None:
    from linquant.demo import load_model

    st = load_model()
    quantize_model(st, "w4a16-g32")
    save(st, tmp_path / "q")
    loaded = load(tmp_path / "q")
    codes = _codes(loaded)
    assert codes and all(mapped.is_mapped(t) for t in codes.values())
