"""QuantLinear: equals F.linear on the dequantized weight, SQNR floors, Conv1D, .to(), state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linquant as lq
from linquant.nn import QuantLinear

# Output SQNR (dB) vs the float layer, Linear(256, 128) default init, x ~ N(0, 1) [4, 16, 256].
# Measured over 20 seeds (min / mean): int8-sym-ch0 48.0/48.2, int4-sym-g32 23.2/23.3,
# int4-asym-g32 23.8/24.0, int4-asymf-g32 24.1/24.3, int4-sym-ch0 22.8/23.0; floors ~1 dB below.
SQNR_FLOORS = {
    "int8-sym-ch0": 47.0,
    "int8-asym-ch0": 47.0,
    "int4-sym-g32-fp16": 22.0,
    "int4-asym-g32-fp16": 22.8,
    "int4-asymf-g32-fp16": 23.0,
    "int4-sym-ch0": 21.8,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ALL_SCHEMES = [
    "int8-sym-ch0", "int4-sym-g32-fp16", "int4-asym-g32-fp16", "int4-asymf-g32-bf16",
    "int3-asym-tensor", "int5-sym-ch1", "int2-asym-ch-1-fp16", "int6-sym-g16-mse",
    "int4-asym-ch0-mse", "int7-asymf-tensor",
]


def _conv1d(nx: int, nf: int) -> nn.Module:
    pu = pytest.importorskip("transformers.pytorch_utils",
                             reason="transformers is not installed (Conv1D tests)")
    torch.manual_seed(1)
    c = pu.Conv1D(nf, nx)
    with torch.no_grad():
        c.bias.normal_()
    return c  # type: ignore[no-any-return]


@pytest.mark.parametrize("scheme", list(SQNR_FLOORS))
def test_sqnr_floor_vs_float_layer(scheme: str) -> None:
    lin = nn.Linear(256, 128)
    x = torch.randn(4, 16, 256)
    q = QuantLinear.from_float(lin, scheme, name="fc")
    assert lq.sqnr(lin(x), q(x)) >= SQNR_FLOORS[scheme]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g32-fp16", "int3-asymf-g16-bf16"])
def test_equals_f_linear_on_dequantized_weight(scheme: str, dtype: torch.dtype) -> None:
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_float(lin, scheme)
    x = torch.randn(2, 7, 64, dtype=dtype)  # (B, T, C)
    y = q(x)
    assert y.dtype == dtype and y.shape == (2, 7, 48)
    expected = F.linear(x, q.qweight.dequantize(dtype), lin.bias.detach().to(dtype))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_qweight_is_the_quantized_weight_and_no_float_weight_is_kept() -> None:
    lin = nn.Linear(64, 16)
    q = QuantLinear.from_float(lin, "int4-asym-g32-fp16")
    ref = lq.quantize(lin.weight.detach(), "int4-asym-g32-fp16")
    for role, t in ref.tensors().items():
        assert torch.equal(q.qweight.tensors()[role], t)
    assert [n for n, _ in q.named_parameters()] == ["bias"]
    assert sorted(n for n, _ in q.named_buffers()) == [
        "weight_qdata", "weight_scale", "weight_zero_point"]
    assert all(b.device.type == "cpu" for b in q.buffers())
    assert torch.equal(q.bias, lin.bias) and q.bias.data_ptr() != lin.bias.data_ptr()


def test_offset_buffer_for_asymf() -> None:
    q = QuantLinear.from_float(nn.Linear(32, 8), "int4-asymf-g16-bf16")
    assert sorted(n for n, _ in q.named_buffers()) == ["weight_offset", "weight_qdata",
                                                       "weight_scale"]
    assert q.weight_offset.dtype == torch.bfloat16 and q.weight_offset.shape == (8, 2)


def test_bias_none() -> None:
    lin = nn.Linear(32, 8, bias=False)
    q = QuantLinear.from_float(lin, "int8-sym-ch0")
    assert q.bias is None
    x = torch.randn(3, 32)
    torch.testing.assert_close(q(x), F.linear(x, q.qweight.dequantize()), rtol=0, atol=0)


def test_extra_repr_shows_features_and_scheme() -> None:
    q = QuantLinear.from_float(nn.Linear(32, 8), "int4-sym-g16-fp16")
    assert repr(q) == (
        "QuantLinear(in_features=32, out_features=8, bias=True, scheme=int4-sym-g16-fp16)"
    )


# ---- dtype and device moves -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g32-fp16", "int4-asymf-g32"])
def test_to_bfloat16_keeps_quantized_buffers_and_computes_in_bf16(scheme: str) -> None:
    lin = nn.Linear(64, 32)
    model = nn.Sequential(QuantLinear.from_float(lin, scheme, name="0"))
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.to(torch.bfloat16)
    q = model[0]
    for n, b in model.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    assert q.bias.dtype == torch.bfloat16
    assert q.weight_dtype == torch.bfloat16 and q.qweight.dequantize().dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, q.qweight.dequantize(), q.bias), rtol=0, atol=0)
    assert lq.sqnr(lin(x.float()), y.float()) > 20
    model.float()
    assert q.bias.dtype == torch.float32 and q.weight_scale.dtype == before["0.weight_scale"].dtype


def test_half_and_to_device_keep_codes() -> None:
    q = QuantLinear.from_float(nn.Linear(16, 8), "int8-sym-ch0-fp16")
    codes = q.qweight.codes().clone()
    q.half().to("cpu")
    assert q.weight_scale.dtype == torch.float16 and torch.equal(q.qweight.codes(), codes)
    q.to("meta")
    assert q.weight_qdata.device.type == "meta" and q.weight_qdata.dtype == torch.uint8


def test_double_computes_in_fp64() -> None:
    q = QuantLinear.from_float(nn.Linear(16, 8), "int4-sym-g8").double()
    x = torch.randn(3, 16, dtype=torch.float64)
    assert q(x).dtype == torch.float64 and q.weight_scale.dtype == torch.float32
    torch.testing.assert_close(q(x), F.linear(x, q.qweight.dequantize(), q.bias), rtol=0, atol=0)


# ---- state dict -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g32-fp16", "int3-asymf-g16-bf16"])
def test_state_dict_round_trip_into_fresh_module(scheme: str) -> None:
    lin = nn.Linear(64, 24)
    q = QuantLinear.from_float(lin, scheme, name="fc")
    sd = q.state_dict()
    assert set(sd) == {f"weight_{r}" for r in q.qweight.tensors()} | {"bias"}
    fresh = QuantLinear(64, 24, scheme)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), q(x))
    also = QuantLinear.skeleton(lin, scheme, device="meta")
    also.load_state_dict(sd, assign=True)
    assert torch.equal(also(x), q(x))


# ---- HF Conv1D ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_conv1d_quantizes_like_the_transposed_linear(scheme: str) -> None:
    c = _conv1d(nx=64, nf=48)
    q = QuantLinear.from_float(c, scheme, name="attn.c_attn")
    assert (q.in_features, q.out_features) == (64, 48)
    ref = lq.quantize(c.weight.detach().t().contiguous(), scheme)
    got = q.qweight
    assert tuple(got.shape) == (48, 64)
    for role, t in ref.tensors().items():
        assert torch.equal(got.tensors()[role], t), role
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(
        q(x), F.linear(x, ref.dequantize(), c.bias.detach()), rtol=0, atol=0
    )


def test_conv1d_sqnr_and_forward_shape() -> None:
    c = _conv1d(nx=128, nf=96)
    x = torch.randn(2, 5, 128)
    q = QuantLinear.from_float(c, "int8-sym-ch0")
    y = q(x)
    assert y.shape == (2, 5, 96)
    assert lq.sqnr(c(x), y) > 45


# ---- bad input ----------------------------------------------------------------------------------


def test_wrong_last_dim_names_the_layer() -> None:
    q = QuantLinear.from_float(nn.Linear(32, 8), "int8-sym-ch0", name="encoder.layer.0.fc")
    with pytest.raises(lq.LinquantError, match=r"encoder\.layer\.0\.fc.*\[\.\.\., 32\]"):
        q(torch.randn(4, 31))


def test_integer_input_names_the_layer() -> None:
    q = QuantLinear.from_float(nn.Linear(32, 8), "int8-sym-ch0", name="fc1")
    with pytest.raises(lq.LinquantError, match=r"fc1.*float"):
        q(torch.ones(4, 32, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sparse_input_computes_as_its_dense_values(dtype: torch.dtype) -> None:
    """A sparse COO input (which ``nn.Linear`` takes) gives the dense input's output, on the
    kernels' path and not the reference's."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 8), "int4-asym-g32").to(dtype)
    x = (torch.randn(3, 64) * (torch.rand(3, 64) < 0.3)).to(dtype)
    with torch.no_grad():
        for _ in range(3):  # a kept plan for the shape: the sparse input failed there
            assert torch.equal(q(x.to_sparse()), q(x))


def test_from_float_refuses_other_modules_naming_the_layer() -> None:
    with pytest.raises(lq.LinquantError, match=r"'blocks.3'.*Conv2d"):
        QuantLinear.from_float(nn.Conv2d(3, 3, 1), "int8-sym-ch0", name="blocks.3")


def test_group_size_must_divide_in_features() -> None:
    with pytest.raises(lq.LinquantError, match=r"'head'.*group_size 32"):
        QuantLinear.from_float(nn.Linear(48, 8), "int4-sym-g32", name="head")


def test_bad_scheme_type() -> None:
    with pytest.raises(lq.LinquantError, match=r"scheme"):
        QuantLinear(4, 4, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [
    lambda n: QuantLinear(n, 4, "int8-sym-ch0"),
    lambda n: QuantLinear(4, n, "int8-sym-ch0"),
    lambda n: lq.nn.W8A8Linear(n, 4),
    lambda n: lq.nn.QuantEmbedding(n, 8, "int8-sym-ch0"),
], ids=["linear-in", "linear-out", "w8a8", "embedding"])
@pytest.mark.parametrize("size", [-1, 0, 5.5, True, "8"])
def test_layer_sizes_must_be_positive_ints(make: object, size: object) -> None:
    """QuantLinear(5.5, 3) became a 5-input layer; QuantLinear(-1, 5) raised torch's own
    error."""
    with pytest.raises(lq.LinquantError, match=r"must be a positive int, got "):
        make(size)  # type: ignore[operator]


def test_meta_tensors_are_named_errors_and_meta_layers_give_shapes() -> None:
    with pytest.raises(lq.LinquantError, match=r"weight: a meta tensor has no values"):
        QuantLinear.from_float(nn.Linear(64, 8, device="meta"), "int8-sym-ch0")
    with pytest.raises(lq.LinquantError, match=r"tensor: a meta tensor has no values"):
        lq.quantize(torch.empty(4, 64, device="meta"))
    emb = lq.nn.QuantEmbedding.from_float(nn.Embedding(10, 64), "int8-sym-ch0").to("meta")
    ids = torch.tensor([[1, 2]], device="meta")
    assert emb(ids).shape == (1, 2, 64)  # as nn.Embedding on meta (it read the indices)


@pytest.mark.parametrize("preset", ["w8a32", "w4a16-g32", "w8a8"])
def test_share_memory_after_use_keeps_the_outputs(preset: str) -> None:
    """``share_memory()`` (also done to the parent's tensors when a model is handed to a
    ``torch.multiprocessing`` child) moves each buffer's bytes without a new version: the
    embedding's gather and the weight-only dequantizers kept reading the old address (outputs
    off by 1e32, or a segfault for a large table). Kept layouts and plans now check the
    address too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 96, bias=False),
                          nn.Linear(96, 64))
    lq.quantize_model(model, preset)
    model = model.float() if preset == "w8a8" else model
    ids = torch.randint(0, 300, (3, 100))  # 300 tokens: the scratch / blocked paths too
    with torch.no_grad():
        want = [model(ids) for _ in range(2)][-1]
        model.share_memory()
        assert all(b.is_shared() for b in model.buffers())
        for _ in range(2):  # a kept layout, then a kept plan
            assert torch.equal(model(ids), want)


@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g32"])
def test_second_derivatives_go_through_the_layer(scheme: str) -> None:
    """The kernels' autograd function had a once-differentiable backward: Hessians and
    Hessian-vector products through a quantized layer came back all zero (no error), and a
    gradient penalty raised. They now equal the float layer's on the dequantized weight."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 48), scheme).double()
    w = q.weight.detach()

    def f_q(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(q(x)).pow(2).sum()

    def f_ref(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, w, q.bias)).pow(2).sum()

    x = torch.randn(3, 64, dtype=torch.float64)
    h_q = torch.autograd.functional.hessian(f_q, x)
    h_ref = torch.autograd.functional.hessian(f_ref, x)
    assert h_ref.abs().max() > 0.1
    torch.testing.assert_close(h_q, h_ref, rtol=1e-10, atol=1e-12)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(f_q(x), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)  # a gradient penalty
    (g_ref,) = torch.autograd.grad(f_ref(x), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), x)
    torch.testing.assert_close(gg, gg_ref, rtol=1e-10, atol=1e-12)


def test_torch_func_transforms_go_through_the_layers() -> None:
    """``vmap``, ``grad``, ``jacrev`` and ``jacfwd`` failed on every quantized layer (the
    kernels' autograd functions, ctypes calls and host-side checks do not compose with them).
    Under a transform the layers compute with the reference's PyTorch ops: the float layer's
    results on the dequantized weight, and W8A8's eager values with its straight-through
    gradient."""
    from torch.func import grad, jacfwd, jacrev, vmap

    from linquant.nn import QuantEmbedding, W8A8Linear

    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 32), "int4-asym-g32")
    w, b = q.weight.detach(), q.bias.detach()
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(vmap(q)(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad(lambda t: q(t).pow(2).sum())(x[0]),
                               2 * F.linear(x[0], w, b) @ w, rtol=1e-5, atol=1e-5)
    for jac in (jacrev, jacfwd):
        torch.testing.assert_close(jac(q)(x[0, 0]), w, rtol=0, atol=0)
    emb = QuantEmbedding.from_float(nn.Embedding(50, 16), "int4-sym-g8")
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(vmap(emb)(ids), emb(ids))
    for kind in ("dynamic", "static"):
        w8 = W8A8Linear.from_float(nn.Linear(64, 32), activation=kind)  # type: ignore[arg-type]
        if kind == "static":
            w8.set_activation_range(-2.0, 2.0)
        with torch.no_grad():
            assert torch.equal(vmap(w8)(x), torch.stack([w8(t) for t in x]))
        w_deq = w8.weight_qdata.float() * w8.weight_scale.float()
        t0 = x[0].clone().requires_grad_(True)
        w8(t0).sum().backward()  # the eager straight-through gradient
        assert t0.grad is not None
        torch.testing.assert_close(grad(lambda t, w8=w8: w8(t).sum())(x[0]), t0.grad)
        if kind == "dynamic":
            torch.testing.assert_close(t0.grad, w_deq.sum(0).expand(5, 64))


def test_a_first_call_under_autocast_keeps_the_native_kernels() -> None:
    """The first call builds a native kernel and checks it on a small product; under the
    caller's ``torch.autocast`` that check failed ("Unexpected floating ScalarType") and the
    kernel stayed off for the whole process, at about half the speed. It runs outside autocast
    now (a child process: the kernels' state is the process's)."""
    import subprocess
    import sys

    code = (
        "import torch, linquant as lq\n"
        "from linquant.kernels import native\n"
        "m = torch.nn.Sequential(torch.nn.Linear(256, 256))\n"
        "lq.quantize_model(m, 'w4a16-g32')\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():\n"
        "    m(torch.randn(1, 256, dtype=torch.bfloat16))\n"
        "print(native.status('w4a16'), native.status('avx2'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, check=True)
    assert "build failed" not in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("preset", ["w8a32", "w4a16-g32", "w8a8"])
def test_autocast_gives_its_dtype_on_every_path(preset: str) -> None:
    """Under ``torch.autocast("cpu", bfloat16)`` an fp32 input gave fp32 outputs on some
    paths (the native kernels, up to 127 tokens) and bf16 on others (scratch, 128 and more),
    and fp32 again when it needed a gradient. Now, as ``nn.Linear``: bf16 always, the layer's
    result on the input cast to bf16."""
    from linquant.nn import W8A8Linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    lq.quantize_model(model, preset)
    q = model[0]
    if isinstance(q, W8A8Linear):
        q.float()
    for m in (1, 65, 300):
        x = torch.randn(m, 256)
        for grad in (False, True):
            xg = x.clone().requires_grad_(grad)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = q(xg)
            assert y.dtype == torch.bfloat16, (m, grad)
            with torch.no_grad():
                want = q(x.bfloat16())
            if grad:  # the bias added after the kernel, where autograd sees it: 1 bf16 step
                torch.testing.assert_close(y.detach(), want, rtol=1e-2, atol=1e-2)
            else:
                assert torch.equal(y, want), m
            if grad:
                y.float().sum().backward()
                assert xg.grad is not None and xg.grad.dtype == torch.float32
