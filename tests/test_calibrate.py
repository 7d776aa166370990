"""calibrate(): min/max and percentile ranges for static W8A8 layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import linquant as lq
from linquant.calibrate import RangeObserver, calibrate
from linquant.nn import W8A8Linear


def _float() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _model(act_symmetric: bool = True) -> nn.Sequential:
    fl = _float()
    return nn.Sequential(
        W8A8Linear.from_float(fl[0], activation="static", act_symmetric=act_symmetric,
                              name="fc1"),
        nn.ReLU(),
        W8A8Linear.from_float(fl[2], activation="static", act_symmetric=act_symmetric,
                              name="fc2"),
    )


def test_minmax_over_batches_sets_every_static_layer() -> None:
    model = _model(act_symmetric=False)
    batches = [torch.randn(4, 16), torch.randn(4, 16) * 3, torch.randn(2, 5, 16)]
    with calibrate(model) as obs:
        for b in batches:
            model(b)
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    assert obs["0"].batches == 3 and obs["0"].range() == pytest.approx((lo, hi))
    assert obs["0"].rows == 4 + 4 + 10  # tokens: input vectors of 16
    expected = W8A8Linear.from_float(nn.Linear(16, 32), activation="static", act_symmetric=False)
    expected.set_activation_range(lo, hi)
    assert torch.equal(model[0].input_scale, expected.input_scale)
    assert torch.equal(model[0].input_zero_point, expected.input_zero_point)
    # fc2 sees ReLU outputs: its range starts at 0
    assert obs["2"].range()[0] == 0.0
    assert all(m.calibrated and not m.observing for m in (model[0], model[2]))
    assert model(torch.randn(3, 16)).shape == (3, 8)


def test_calibration_runs_layers_with_float_activations() -> None:
    model = _model()
    x = torch.randn(4, 16)
    with calibrate(model):
        y = model(x)
    h = torch.relu(nn.functional.linear(x, model[0].qweight.dequantize(), model[0].bias))
    expected = nn.functional.linear(h, model[2].qweight.dequantize(), model[2].bias)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_percentile_symmetric_clips_an_outlier() -> None:
    model = _model(act_symmetric=True)
    x = torch.randn(256, 16)
    x[0, 0] = 100.0
    with calibrate(model, percentile=99.0) as obs:
        model(x)
    lo, hi = obs["0"].range()
    a = float(torch.quantile(x.abs().reshape(-1), 0.99))
    assert hi == pytest.approx(a) and lo == pytest.approx(-a) and hi < 5
    assert float(model[0].input_scale) == pytest.approx(a / 127)


def test_percentile_asymmetric_and_batch_weighting() -> None:
    obs = RangeObserver(symmetric=False, percentile=90.0)
    b1, b2 = torch.arange(100.0), torch.arange(300.0) + 1000
    obs.update(b1)
    obs.update(b2)
    lo1, hi1 = float(torch.quantile(b1, 0.1)), float(torch.quantile(b1, 0.9))
    lo2, hi2 = float(torch.quantile(b2, 0.1)), float(torch.quantile(b2, 0.9))
    lo, hi = obs.range()
    assert lo == pytest.approx((100 * lo1 + 300 * lo2) / 400)
    assert hi == pytest.approx((100 * hi1 + 300 * hi2) / 400)


def test_percentile_uses_a_bounded_seeded_sample() -> None:
    x = torch.randn(200_000)
    a, b = (RangeObserver(symmetric=True, percentile=99.9, sample_size=4096) for _ in range(2))
    a.update(x)
    b.update(x)
    assert a.range() == b.range()  # seeded: runs repeat
    exact = float(torch.quantile(x[:16_000_000].abs(), 0.999))
    assert a.range()[1] == pytest.approx(exact, rel=0.15)


def test_layer_that_saw_no_batch_raises_and_nothing_changes() -> None:
    model = _model()
    with pytest.raises(lq.LinquantError, match=r"saw no batch: 2"), calibrate(model):
        model[0](torch.randn(2, 16))  # fc2 never runs
    assert not model[0].calibrated and not model[0].observing
    assert not model[0]._forward_pre_hooks


@pytest.mark.parametrize("act_symmetric", [True, False])
def test_unreached_dynamic_gives_unreached_layers_dynamic_activations(
        tmp_path: Path, act_symmetric: bool) -> None:
    """``unreached="dynamic"``: the layers no batch reached compute with dynamic per-token
    activations (their input scale, and zero point, dropped), the others are calibrated; the
    model runs as a W8A8 model with fc2 dynamic, and saves and loads so."""
    from linquant.io.save import load_into, save

    model = _model(act_symmetric)
    x = torch.randn(4, 16)
    with calibrate(model, unreached="dynamic") as obs:
        model[0](x)  # fc2 never runs
    assert obs["2"].batches == 0 and obs["0"].batches == 1
    assert model[0].activation == "static" and model[0].calibrated
    assert model[2].activation == "dynamic" and model[2].act_symmetric
    assert not {"input_scale", "input_zero_point"} & set(model[2]._buffers)
    dynamic = W8A8Linear.from_float(_float()[2], activation="dynamic", name="fc2")
    with torch.no_grad():
        h = model[1](model[0](x))
        assert torch.equal(model[2](h), dynamic(h))
        y = model(x)
    save(model, tmp_path / "q")
    back = load_into(_float(), tmp_path / "q")
    assert back[2].activation == "dynamic" and back[0].calibrated
    # into a model quantized static again, as before calibrating: fc2 switches as the file has it
    again = load_into(_model(act_symmetric), tmp_path / "q")
    assert again[2].activation == "dynamic" and again[0].calibrated
    with torch.no_grad():
        assert torch.equal(back(x), y) and torch.equal(again(x), y)
    with pytest.raises(lq.LinquantError, match=r"unreached must be 'raise' \(or 'error'\) or "
                                               r"'dynamic'"), \
            calibrate(_model(), unreached="skip"):
        pass
    # the CLI's word for the default is taken too
    with pytest.raises(lq.LinquantError, match="saw no batch"), \
            calibrate(_model(), unreached="error"):
        pass


def test_exception_in_body_removes_hooks_and_propagates() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match=r"boom"), calibrate(model):
        raise RuntimeError("boom")
    assert not model[0]._forward_pre_hooks and not model[2].calibrated


def test_bad_arguments() -> None:
    model = _model()
    # below 50, an asymmetric layer's upper percentile fell under its lower one: "range must
    # be finite with lo <= hi" at the end, after every batch had run
    for p in (0.0, 100.5, -1.0, 30.0, 50.0, True):
        with pytest.raises(lq.LinquantError, match=r"percentile"), calibrate(model, percentile=p):
            pass
    with pytest.raises(lq.LinquantError, match=r"no static W8A8Linear"), calibrate(
        nn.Sequential(W8A8Linear.from_float(nn.Linear(2, 2)))
    ):
        pass


def test_calibrated_model_sqnr() -> None:
    torch.manual_seed(0)
    fl = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    q = nn.Sequential(
        W8A8Linear.from_float(fl[0], activation="static"),
        nn.GELU(),
        W8A8Linear.from_float(fl[2], activation="static", act_symmetric=False),
    )
    with calibrate(q):
        for _ in range(4):
            q(torch.randn(32, 64))
    x = torch.randn(16, 64)
    assert lq.sqnr(fl(x), q(x)) > 30


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("percentile", [None, 99.9])
def test_non_finite_inputs_change_no_layer(bad: float, percentile: float | None) -> None:
    """A batch with Inf / NaN reaching one layer: the ranges were set layer by layer, and the
    error ("activation range must be finite") came after the layers before it had their new
    ranges: a recalibrated model was left half old, half new. Now every range is checked
    first, and the message says the inputs were not finite."""
    model = _model()
    with calibrate(model):
        model(torch.randn(8, 16))
    before = [(m.input_scale.clone(), m.calibrated) for m in (model[0], model[2])]
    with pytest.raises(lq.LinquantError, match=r"1 static layer\(s\) saw NaN or Inf inputs: "
                       r"2 \[.*no layer was changed"), calibrate(model, percentile):
        model(torch.randn(8, 16) * 3)  # new ranges for both
        model[2](torch.full((1, 32), bad))
    after = [(m.input_scale, m.calibrated) for m in (model[0], model[2])]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(before, after,
                                                                       strict=True))
    if percentile is not None:  # one bad value among more than the percentile's sample: the
        # sample missed it and the layer was calibrated from the finite rest
        x = torch.randn(64, 32)
        x[5, 7] = bad
        with pytest.raises(lq.LinquantError, match=r"saw NaN or Inf inputs: 2 "), \
                calibrate(model, percentile, sample_size=100):
            model(torch.randn(8, 16))
            model[2](x)
