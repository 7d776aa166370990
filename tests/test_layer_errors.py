"""compare_layers: each quantized layer measured on the input its float layer gets."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import linquant as lq
from linquant.errors import LinquantError
from linquant.layer_errors import LayerErrors


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.fc1 = nn.Linear(64, 96)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(96, 64)
        self.conv = nn.Conv1d(64, 32, 3, padding=1)
        self.unused = nn.Linear(64, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.act(self.fc1(self.emb(ids))))
        out: torch.Tensor = self.conv(h.transpose(1, 2))
        return out


IDS = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(0))


def _pair(config: object = "int4-asym-g32-fp16") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = Net().eval()
    q = copy.deepcopy(ref)
    lq.quantize_model(q, config)  # type: ignore[arg-type]
    return ref, q


def _captured_inputs(ref: nn.Module, names: list[str]) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [ref.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().clone())) for n in names]
    with torch.no_grad():
        ref(IDS)
        ref(IDS[:1, :4])
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("config", ["int4-asym-g32-fp16", "int8-sym-ch0", "w4a16-g32", "w8a8"])
def test_each_layer_is_measured_on_the_float_layers_input(config: str) -> None:
    """A row's SQNR is the quantized layer's output error on exactly what the float layer got
    (two batches pooled): errors of the layers before it do not reach it."""
    ref, q = _pair(config)
    names = ["emb", "fc1", "fc2", "conv"]
    inputs = _captured_inputs(ref, names)
    with lq.compare_layers(ref, q) as errors, torch.no_grad():
        ref(IDS)
        ref(IDS[:1, :4])
    for name in names:
        row = errors[name]
        f, ql = ref.get_submodule(name), q.get_submodule(name)
        dtype = getattr(ql, "weight_dtype", torch.float32)
        with torch.no_grad():
            ys = [f(x).double() for x in inputs[name]]
            yqs = [ql(x.to(dtype) if x.is_floating_point() else x).double()
                   for x in inputs[name]]
        signal = sum(float((y * y).sum()) for y in ys)
        noise = sum(float(((y - yq) ** 2).sum()) for y, yq in zip(ys, yqs, strict=True))
        assert row.calls == 2 and row.reason is None
        assert row.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-9), name
        assert row.max_abs_error == pytest.approx(
            max(float((y - yq).abs().max()) for y, yq in zip(ys, yqs, strict=True)), rel=1e-9)
        assert row.type == type(ql).__name__
    assert errors["unused"].reason == "not reached by the inputs"
    assert errors["unused"].sqnr_db is None and errors["unused"].calls == 0
    assert [r.name for r in errors.rows] == ["emb", "fc1", "fc2", "conv", "unused"]
    worst = errors.worst(2)
    assert len(worst) == 2 and worst[0].sqnr_db is not None and worst[1].sqnr_db is not None
    assert worst[0].sqnr_db <= worst[1].sqnr_db <= min(
        r.sqnr_db for r in errors.rows if r.sqnr_db is not None and r not in worst)


@pytest.mark.parametrize("config", ["int4-asym-g32-fp16", "w4a16-g32", "w8a8"])
def test_weight_sqnr_is_the_quantize_reports(config: str) -> None:
    torch.manual_seed(0)
    ref = Net().eval()
    q = copy.deepcopy(ref)
    report = lq.quantize_model(q, config)
    with lq.compare_layers(ref, q) as errors, torch.no_grad():
        ref(IDS)
    for row in errors.rows:
        assert row.weight_sqnr_db == pytest.approx(report[row.name].sqnr_db, rel=1e-6), row.name
    assert "weight SQNR dB" in str(errors)


def test_floors_schemes_and_the_table() -> None:
    ref, q = _pair({"fc1": "int8-sym-ch0", "fc2": "w8a8", "*": "int4-sym-g16-fp16"})
    with lq.compare_layers(ref, q) as errors, torch.no_grad():
        ref(IDS)
    assert errors["fc1"].scheme == "int8-sym-ch0-fp32"
    assert errors["fc2"].scheme == "int8-sym-ch0-fp32, act int8 dynamic"
    assert errors["emb"].scheme == "int4-sym-g16-fp16"
    fc1, fc2, emb = errors["fc1"].sqnr_db, errors["fc2"].sqnr_db, errors["emb"].sqnr_db
    assert fc1 is not None and fc2 is not None and emb is not None
    assert fc1 > 38 and fc2 > 30 and emb > 15
    text = str(errors)
    assert "output SQNR dB" in text and "not reached by the inputs" in text
    assert text.splitlines()[-1].startswith("lowest output SQNR: ")
    assert errors.to_dicts()[1]["name"] == "fc1"


def test_the_float_model_computes_as_without_the_hooks_and_keeps_none() -> None:
    ref, q = _pair()
    with torch.no_grad():
        before = ref(IDS)
        with lq.compare_layers(ref, q):
            during = ref(IDS)
    assert torch.equal(before, during)
    assert all(not m._forward_hooks for m in ref.modules())
    with pytest.raises(RuntimeError, match="boom"), lq.compare_layers(ref, q):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in ref.modules())


def test_layers_without_a_float_counterpart_and_bad_arguments() -> None:
    ref, q = _pair()
    del ref.conv
    ref.forward = lambda ids: ref.fc2(ref.act(ref.fc1(ref.emb(ids))))  # type: ignore[method-assign]
    with lq.compare_layers(ref, q) as errors, torch.no_grad():
        ref(IDS)
    assert errors["conv"].reason == "no module of this name in the reference model"
    assert errors["fc1"].sqnr_db is not None
    with pytest.raises(LinquantError, match="no quantized layer"), lq.compare_layers(ref, ref):
        pass
    with lq.compare_layers(q, q) as same, torch.no_grad():  # quantized in place: no float model
        q(IDS)
    assert {r.reason for r in same.rows} == {
        "the reference model holds this same quantized module (compare with a float copy)"}
    with pytest.raises(LinquantError, match=r"reference must be an nn\.Module"), \
            lq.compare_layers("model", q):  # type: ignore[arg-type]
        pass


def test_an_exact_layer_has_infinite_sqnr() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        ref[0].weight.copy_(torch.randint(-7, 8, (4, 8)).float())
        ref[0].weight[0, 0] = 7.0  # the scale is 1: every weight is a code
        ref[0].bias.zero_()
    q = copy.deepcopy(ref)
    lq.quantize_model(q, "int4-sym-tensor")
    with lq.compare_layers(ref, q) as errors, torch.no_grad():
        ref(torch.randint(-3, 4, (5, 8)).float())
    assert isinstance(errors, LayerErrors) and errors["0"].sqnr_db == math.inf
    assert "inf" in str(errors)


@pytest.mark.cuda
def test_float_model_on_the_cpu_quantized_one_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ref, q = _pair("w4a16-g32")
    with lq.compare_layers(ref, q) as on_cpu, torch.no_grad():
        ref(IDS)
    q.to("cuda")
    with lq.compare_layers(ref, q) as on_gpu, torch.no_grad():
        ref(IDS)
    for a, b in zip(on_cpu.rows, on_gpu.rows, strict=True):
        assert a.name == b.name and (a.sqnr_db is None) == (b.sqnr_db is None)
        if a.sqnr_db is not None and b.sqnr_db is not None:
            assert b.sqnr_db == pytest.approx(a.sqnr_db, abs=1.0), a.name  # other kernels
