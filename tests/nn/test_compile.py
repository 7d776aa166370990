"""Quantized models under ``torch.compile``. ``QuantLinear`` and ``W8A8Linear`` are one opaque
custom-operator node each in the graph (``linquant::linear_weight_only``,
``linquant::linear_w8a8``, whose implementations are the eager dispatchers); where autograd is
involved, and while calibrating, ``W8A8Linear`` runs between graphs (``eager_only``);
``QuantEmbedding`` and ``QuantConv2d`` are traced like any PyTorch code. No kernel code,
native (ctypes) or Triton, is ever traced: doing so once crashed the process (Dynamo split
``native._run_avx2`` at the ctypes call). The compiled model returns what the eager one does,
bit for bit with the eager backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import linquant as lq
from linquant.kernels import compiled
from linquant.nn import QuantConv2d, QuantEmbedding, QuantLinear, W8A8Linear, clear_kernel_caches


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = QuantEmbedding.from_float(nn.Embedding(50, 64), "int4-sym-g32")
        self.conv = QuantConv2d.from_float(nn.Conv2d(1, 4, 3, padding=1), "int8-sym-ch0")
        self.a = QuantLinear.from_float(nn.Linear(64, 256), "int8-sym-ch0")
        self.b = QuantLinear.from_float(nn.Linear(256, 64), "int4-asym-g32")
        self.c = W8A8Linear.from_float(nn.Linear(64, 64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # [B, T, 64]
        h = h + self.conv(h[:, None])[:, 0]  # one channel in, the first of 4 out
        h = self.b(torch.nn.functional.gelu(self.a(h)))
        return self.c(h) + h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_model_matches_eager(dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    net = Net().to(dtype) if dtype != torch.float32 else Net()
    if dtype != torch.float32:
        net.c = W8A8Linear.from_float(nn.Linear(64, 64))  # W8A8 takes fp32 in
        net.c.forward = (lambda f: lambda x: f(x.float()).to(x.dtype))(net.c.forward)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = net(ids)
        compiled = torch.compile(net, backend="eager")
        for _ in range(3):  # first call traces, later ones run the compiled frames
            got = compiled(ids)
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_run_eagerly_between_graphs(dtype: torch.dtype) -> None:
    """QuantExperts' routing is data-dependent and its projections call the kernels directly:
    under torch.compile its forward runs eagerly (a graph break), the same bits as eager."""
    import linquant as lq

    sys.path.insert(0, str(Path(__file__).parent))
    from test_experts import Block

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block(hidden=64, inter=64).eval()
    lq.quantize_model(model, "int4-asym-g32-fp16")
    model.to(dtype)
    x = torch.randn(9, 64, dtype=dtype)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, backend="eager")
        for _ in range(3):
            assert torch.equal(compiled(x), want)
        torch._dynamo.reset()  # (the frames compiled above would be reused)
        with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
            torch.compile(model, backend="eager", fullgraph=True)(x)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager() -> None:
    """The default backend (inductor: generated C++ around the quantized layers)."""
    torch._dynamo.reset()
    net = Net()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = net(ids)
        got = torch.compile(net)(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CRASHED = """
import torch
from linquant.nn import QuantLinear
torch.manual_seed(0)
q = QuantLinear.from_float(torch.nn.Linear(256, 512), "{scheme}")
x = torch.randn(4, 256)
with torch.no_grad():
    want = q(x)
    compiled = torch.compile(q, backend="eager")
    for _ in range(3):
        got = compiled(x)
print("same", torch.equal(got, want))
"""


@pytest.mark.parametrize("scheme", ["int8-sym-ch0", "int4-asym-g32"])
def test_compiled_layer_that_once_crashed(scheme: str) -> None:
    """The shape that aborted the process (``malloc(): unaligned tcache chunk detected``) when
    Dynamo traced into ``QuantLinear.forward`` on the native AVX2 path; in a subprocess, so a
    crash fails this test instead of ending the run."""
    out = subprocess.run([sys.executable, "-c", CRASHED.format(scheme=scheme)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "same True" in out.stdout, out.stderr[-2000:]


def test_importing_linquant_loads_neither_dynamo_nor_triton() -> None:
    """``eager_only`` defers ``torch.compiler.disable`` (which imports Dynamo, and Dynamo
    Triton) to the first call made after Dynamo was loaded: importing linquant stays fast
    (0.07 s against 1.3 s), and Triton is imported only by the GPU paths (its interpreter mode
    is read at import, which the Triton tests set first)."""
    code = ("import sys, linquant, linquant.nn, linquant.kernels, linquant.cli; "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


class Dense(nn.Module):
    """Quantized linear layers around float code, embedding and convolution: no W8A8, so the
    whole model is one graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = QuantEmbedding.from_float(nn.Embedding(50, 64), "int4-sym-g32")
        self.a = QuantLinear.from_float(nn.Linear(64, 96), "int8-sym-ch0")
        self.b = QuantLinear.from_float(nn.Linear(96, 64), "int4-asym-g32-fp16")
        self.c = QuantLinear.from_float(nn.Linear(64, 40, bias=False), "int4-sym-g16")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.c(self.b(torch.nn.functional.gelu(self.a(h))) + h)


def _one_graph(model: nn.Module, *args: torch.Tensor) -> tuple[dict[str, int], torch.Tensor]:
    """Compile with ``fullgraph=True`` and a backend that records the graph and runs it as
    is; returns how many nodes of each linquant operator the one graph holds, and the
    output."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=record, fullgraph=True)(*args)
    assert len(graphs) == 1 and isinstance(out, torch.Tensor)
    ops: dict[str, int] = {}
    for node in graphs[0].graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and name.startswith("linquant."):
            ops[name.split(".")[1]] = ops.get(name.split(".")[1], 0) + 1
    return ops, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_is_one_operator_node_in_a_full_graph(dtype: torch.dtype) -> None:
    """fullgraph=True compiles; each QuantLinear is one ``linquant::linear_weight_only`` node;
    the output is the eager one, bit for bit; the operator's caches are per weight and
    ``clear_kernel_caches`` drops them."""
    net = Dense().to(dtype)
    ids = torch.randint(0, 50, (3, 5))
    layers = (net.a, net.b, net.c)
    with torch.no_grad():
        want = net(ids)
        for m in layers:
            m.kernel_cache().clear()
        ops, got = _one_graph(net, ids)
    assert ops == {"linear_weight_only": 3}
    assert got.dtype == dtype and torch.equal(got, want)
    # the operator ran with its own per-weight caches, which clear_kernel_caches drops
    caches = [m.weight_qdata.__dict__.get(compiled._ATTR) for m in layers]
    assert all(isinstance(c, compiled.OpCache) and c for c in caches)
    held = sum(len(c) for c in caches)
    assert clear_kernel_caches(net) == held
    assert not any(compiled._ATTR in m.weight_qdata.__dict__ for m in layers)


@pytest.mark.parametrize("preset", ["w4a16-g32", "w8a8"])
def test_a_deleted_compiled_model_leaves_no_kernel_cache_behind(preset: str) -> None:
    """The operators' caches lived in a registry keyed by id(codes), freed when the codes
    tensor was; but the layouts and plans in them held that tensor, so a compiled model's
    layouts (a copy of its weights) outlived the model for good. They are now kept on the
    tensor and go with it. Calls through functional_call with the state_dict's uint8 W8A8
    bytes made a new cache entry per call (a new view each time); now one."""
    import copy
    import gc
    import io
    import weakref

    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    lq.quantize_model(model, preset)
    compiled_model = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(4, 256)
    with torch.no_grad():
        want = compiled_model(x)
        compiled_model(x)
        codes = model[0].weight_qdata
        cache = codes.__dict__[compiled._ATTR]
        assert cache  # a layout or plan
        assert not copy.deepcopy(codes).__dict__.get(compiled._ATTR)  # never copied
        buf = io.BytesIO()
        torch.save(model, buf)  # pickles, without the cache
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert not back[0].weight_qdata.__dict__.get(compiled._ATTR)
        assert torch.equal(back(x), want)
        if preset == "w8a8":  # the state_dict's bytes: one cache, one alias, every call
            sd = model.state_dict()
            run = torch.compile(lambda x, m=model, sd=sd: torch.func.functional_call(m, sd, (x,)),
                                backend="eager")
            for _ in range(3):
                assert torch.equal(run(x), want)
            assert len(sd["0.weight_qdata"].__dict__[compiled._ATTR]) == 3  # alias, plan, layout
    gone = weakref.ref(cache)
    del model, compiled_model, codes, cache, back, buf
    if preset == "w8a8":
        del sd, run
    torch._dynamo.reset()
    gc.collect()
    assert gone() is None


def test_compiled_gradients_match_eager() -> None:
    """With autograd on: an input that needs a gradient traces the reference's PyTorch ops
    (the same gradients as eager mode); a bias that needs one is added after the node."""
    net = Dense()

    def run(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = layer(x)
        y.square().sum().backward()
        return (y.detach(), *(t.grad.clone() for t in (x, layer.bias)
                               if t is not None and t.grad is not None))

    for layer in (net.a, net.b):
        for needs_x in (True, False):
            for t in (layer.bias,):
                assert t is not None
                t.grad = None
            h = torch.randn(2, 4, layer.in_features, generator=torch.Generator().manual_seed(3))
            x1 = h.clone().requires_grad_(needs_x)
            want = run(layer, x1)
            assert layer.bias is not None
            layer.bias.grad = None
            torch._dynamo.reset()
            x2 = h.clone().requires_grad_(needs_x)
            got = run(torch.compile(layer, backend="eager", fullgraph=True), x2)  # type: ignore[arg-type]
            assert len(got) == len(want) == (3 if needs_x else 2)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_inductor_full_graph_matches_eager() -> None:
    net = Dense()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = net(ids)
        torch._dynamo.reset()
        got = torch.compile(net, fullgraph=True)(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_w8a8_layers_are_operator_nodes_and_calibration_runs_eagerly() -> None:
    """Dynamic and calibrated static W8A8 layers compile into one graph, one
    ``linquant::linear_w8a8`` node each, with the eager result; calibrating a compiled model
    runs the observing forward eagerly (its ranges are recorded); an uncalibrated static layer
    still raises LinquantError."""
    import linquant as lq
    from linquant.errors import LinquantError

    torch.manual_seed(2)
    dyn = W8A8Linear.from_float(nn.Linear(64, 96))
    stat = W8A8Linear.from_float(nn.Linear(96, 32), activation="static")
    model = nn.Sequential(dyn, nn.GELU(), stat)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch._dynamo.reset()
        with pytest.raises(LinquantError, match="static activation quantization"):
            torch.compile(model, backend="eager")(x)
        torch._dynamo.reset()
        with lq.calibrate(model):
            torch.compile(model, backend="eager")(x)
        want = model(x)
        ops, got = _one_graph(model, x)
    assert ops == {"linear_w8a8": 2}
    assert torch.equal(got, want)


def test_torch_export_keeps_the_operators() -> None:
    """``torch.export`` gives a program with the linquant operators as nodes (the same ones
    torch.compile sees) that runs to the eager result."""
    net = Net()
    ids = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        want = net(ids)
        program = torch.export.export(net, (ids,))
        got = program.module()(ids)
    names = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("linquant.")]
    assert sorted(names) == ["linquant.linear_w8a8.default",
                             "linquant.linear_weight_only.default",
                             "linquant.linear_weight_only.default"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_records_the_linear_operators(grad: bool, tmp_path: Path) -> None:
    """``torch.jit.trace`` (deprecated in PyTorch, still used) records ``QuantLinear`` and
    ``W8A8Linear`` as their operators: the traced module computes on new inputs, and saved and
    loaded back too. It once recorded the kernels' outputs as constants or failed inside
    TorchScript; layers it cannot record refuse with a clear error."""
    import warnings

    from linquant.errors import LinquantError

    torch.manual_seed(0)
    net = nn.Sequential(QuantLinear.from_float(nn.Linear(64, 256), "int8-sym-ch0"), nn.GELU(),
                        QuantLinear.from_float(nn.Linear(256, 64), "int4-asym-g32"),
                        W8A8Linear.from_float(nn.Linear(64, 32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation warnings
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(net, torch.randn(2, 64), check_trace=False)
        traced.save(str(tmp_path / "net.pt"))
        loaded = torch.jit.load(str(tmp_path / "net.pt"))
        kinds = {n.kind() for m in ("0", "2", "3") for n in getattr(traced, m).graph.nodes()}
        assert {"linquant::linear_weight_only", "linquant::linear_w8a8"} <= kinds, kinds
        x = torch.randn(5, 64)  # another shape than the traced one
        with torch.no_grad():
            want = net(x)
            assert torch.equal(traced(x), want) and torch.equal(loaded(x), want)
        other = Net()
        for layer, example in ((other.emb, torch.randint(0, 50, (2, 3))),
                               (other.conv, torch.randn(1, 1, 4, 4))):
            with pytest.raises(LinquantError, match=r"torch\.jit\.trace cannot record"):
                torch.jit.trace(layer, example)


def test_jit_script_refuses_with_a_named_error() -> None:
    """``torch.jit.script`` of a model with linquant layers raises a LinquantError naming the
    first layer and the ways that work; it failed with "Unknown type annotation" before."""
    import linquant as lq
    from linquant.errors import LinquantError

    model = nn.Sequential(nn.ReLU(), nn.ModuleDict({"fc": nn.Linear(8, 4)}))
    lq.quantize_model(model, "w8a32")
    with pytest.raises(LinquantError, match=r"QuantLinear '1\.fc'.*torch\.jit\.script cannot "
                                            r"compile.*torch\.compile"):
        torch.jit.script(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["int4-sym-g128", "int4-asym-g32", "int8-sym-ch0"])
def test_cuda_graphs_capture_quantlinear(scheme: str) -> None:
    """On a GPU, ``mode="reduce-overhead"`` (CUDA graphs) runs a model of QuantLinear layers at
    one and at 16 tokens, replaying the captured launches (tinygemm for one int4 token,
    Triton otherwise), with the eager result (the Triton kernels' split-K sums use fp32
    atomics: equal up to their rounding)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = nn.Sequential(*(QuantLinear.from_float(nn.Linear(512, 512), scheme)
                            for _ in range(3))).to(dev).to(torch.bfloat16)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for m in (1, 16):
            x = torch.randn(m, 512, device=dev, dtype=torch.bfloat16)
            want = model(x)
            for _ in range(4):  # warm-up, record, then replays
                got = compiled(x).clone()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="PyTorch 2.4's export traces with Dynamo: W8A8Linear's eager "
                           "forward between graphs is a graph break there (export under "
                           "no_grad)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_export_with_autograd_on_and_probes_not_yet_run(dtype: torch.dtype) -> None:
    """Exporting a W8A8 model failed unless it had run eagerly first or under no_grad: the
    first call's one-time probe (``cpu_int_mm_exact``, ``torch.equal``) ran on export's fake
    tensors ("DataDependentOutputException: aten.equal.default"), and with autograd on
    (parameters that need grads, as every module has) the layer took the eager kernels, which
    fake tensors cannot run ("quantized nyi in meta tensors"). Now the probes run outside any
    tracing mode and the bias is added after the operator node. The layers after the first get
    inputs that need a gradient (the first bias needs one): export traces the reference's
    PyTorch ops there, as for QuantLinear."""
    from linquant.kernels import cpu, reference

    torch.manual_seed(4)
    model = nn.Sequential(W8A8Linear.from_float(nn.Linear(1024, 1024)), nn.ReLU(),
                          W8A8Linear.from_float(nn.Linear(1024, 256)),
                          QuantLinear.from_float(nn.Linear(256, 64), "int4-asym-g32")).to(dtype)
    x = torch.randn(8, 1024, dtype=dtype)
    for probe in (reference.cpu_int_mm_exact, cpu.onednn_available, cpu._fbgemm_exact):
        probe.cache_clear()  # type: ignore[attr-defined]
    assert torch.is_grad_enabled() and model[0].bias.requires_grad
    program = torch.export.export(model, (x,))
    names = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("linquant.")]
    assert names == ["linquant.linear_w8a8.default"]
    got = program.module()(x)
    with torch.no_grad():
        want = model(x)
    assert got.dtype == dtype
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, want, **tol)
    # the first layer alone: its operator node, the eager kernels' bits
    one = torch.export.export(model[0], (x,))
    assert torch.equal(one.module()(x), model[0](x))


def test_w8a8_full_graph_with_autograd_on() -> None:
    """fullgraph=True with parameters that need grads (the default outside no_grad) raised
    "Skip inlining torch.compiler.disable()": the layer ran eagerly between graphs whenever
    its bias needed a gradient. The bias is added after the node now; the gradients equal
    eager mode's. An input that needs a gradient still runs eagerly between graphs."""
    torch.manual_seed(5)
    layer = W8A8Linear.from_float(nn.Linear(64, 96))
    x = torch.randn(5, 64)

    def run(f: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        assert layer.bias is not None
        layer.bias.grad = None
        y = f(x)
        y.square().sum().backward()
        assert layer.bias.grad is not None
        return y.detach(), layer.bias.grad.clone()

    want = run(layer)
    torch._dynamo.reset()
    got = run(torch.compile(layer, backend="eager", fullgraph=True))  # type: ignore[arg-type]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
