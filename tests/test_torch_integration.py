"""torch.library registration (opcheck), torch.compile(fullgraph=True) forward and
backward, autocast, and the absence of host synchronization (what CUDA graph capture
needs). no_grad / inference_mode: test_determinism_and_memory.py."""
import copy

import pytest
import torch

import cbam_fused
from cbam_fused import launchers as L
from cbam_fused.ops import OPS_RAW

from helpers import assert_close, check_pair, make_module, run_pair


def _op_args(variant, layout, device, dtype=torch.float32):
    """Arguments of both registered ops, from one real forward on a 2x5x3x7 input."""
    m = make_module(variant, 5, device, reduction=2, kernel_size=3)
    w = m.fused_weights()
    x = torch.randn(2, 5, 3, 7, dtype=dtype, device=device)
    x[:, 1] = 0.0  # ties in the max statistics
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xd, p_contig = L.dense_layout(x)
    variant_args = (m.spec.channel_pool, m.spec.spatial_pool, m.spec.kernel_size,
                    m.spec.max_mode, m.spec.bn_eps, w.has_bn)
    weights = (w.fc1_weight, w.fc1_bias, w.fc2_weight, w.fc2_bias, w.conv_weight, w.conv_bias,
               w.bn_weight, w.bn_bias)
    buffers = tuple(None if t is None else t.clone() for t in
                    (w.bn_running_mean, w.bn_running_var, w.bn_num_batches_tracked))
    fwd = (xd, *weights, *buffers, p_contig, *variant_args, w.has_bn, 0.1)
    _, saved_acc, saved_i32 = OPS_RAW.block_forward(*fwd)
    g = torch.randn_like(xd)
    bwd = (g, xd, saved_acc, saved_i32, *weights, *buffers[:2], p_contig, *variant_args,
           w.has_bn, True)
    return {"block_forward": fwd, "block_backward": bwd}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant", ["official", "timm_light", "ultralytics", "no_spatial"])
def test_opcheck(variant, layout, device):
    """Schema (with the BatchNorm buffers the forward mutates), fake (meta) implementation
    vs the real one, and AOT dispatch, for both ops."""
    for name, a in _op_args(variant, layout, device).items():
        torch.library.opcheck(getattr(OPS_RAW, name), a,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


def test_opcheck_backward_gradient_in_the_other_layout(device):
    """torch.compile may hand the backward a gradient in another layout than x (it makes
    the gradients of an autograd.Function contiguous when it cannot trace the backward
    with their strides): dx is in x's layout, and the fake implementation says so."""
    args = list(_op_args("timm", "channels_last", device)["block_backward"])
    args[0] = args[0].contiguous()
    assert not args[0].is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OPS_RAW.block_backward, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))
    dx = OPS_RAW.block_backward(*args)[0]
    assert dx.is_contiguous(memory_format=torch.channels_last)


def test_ops_outputs_match_direct_calls(device):
    """The registered ops run the same code as the eager path."""
    m = make_module("official", 5, device, reduction=2)
    w = m.fused_weights()
    x = torch.randn(2, 5, 3, 7, device=device)
    from cbam_fused.function import DIRECT
    from cbam_fused.ops import OPS
    state = [t.clone() for t in (w.bn_running_mean, w.bn_running_var, w.bn_num_batches_tracked)]
    got = OPS.block_forward(x, True, m.spec, w, True, 0.1)
    after_ops = [t.clone() for t in (w.bn_running_mean, w.bn_running_var, w.bn_num_batches_tracked)]
    for t, v in zip((w.bn_running_mean, w.bn_running_var, w.bn_num_batches_tracked), state):
        t.copy_(v)
    want = DIRECT.block_forward(x, True, m.spec, w, True, 0.1)
    for u, v in zip(got, want):
        assert torch.equal(u, v)
    for u, v in zip(after_ops, (w.bn_running_mean, w.bn_running_var, w.bn_num_batches_tracked)):
        assert torch.equal(u, v)
    g = torch.randn_like(x)
    dx1, grads1 = OPS.block_backward(g, x, True, got[1], got[2], m.spec, w, True, True)
    dx2, grads2 = DIRECT.block_backward(g, x, True, got[1], got[2], m.spec, w, True, True)
    assert torch.equal(dx1, dx2) and grads1.keys() == grads2.keys()
    for n in grads1:
        assert torch.equal(grads1[n], grads2[n]), n


def _fwd_bwd(model, x, g, call=None):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = (model if call is None else call)(x)
    out.backward(g)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, \
        {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("variant,layout", [("official", "nchw"), ("timm", "channels_last")])
def test_compile_fullgraph_matches_eager(backend, variant, layout, device):
    """torch.compile(fullgraph=True): no graph break, forward and backward and the
    BatchNorm running statistics agree with the eager fused block."""
    torch._dynamo.reset()
    eager = make_module(variant, 16, device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for step in range(2):  # the second call runs the cached graph with updated BN state
        x = torch.randn(2, 16, 6, 5, device=device).to(memory_format=fmt)
        g = torch.randn_like(x)
        e = _fwd_bwd(eager, x, g)
        c = _fwd_bwd(compiled_model, x, g, call=compiled)
        what = f"compiled[{backend}] {variant} step {step}"
        assert_close(c[0], e[0], torch.float32, 16 * 30, f"{what} out")
        assert_close(c[1], e[1], torch.float32, 16 * 30, f"{what} dx")
        assert c[0].is_contiguous(memory_format=fmt)
        for n in e[2]:
            assert_close(c[2][n], e[2][n], torch.float32, 2 * 16 * 30, f"{what} grad {n}")
        for n in e[3]:
            if "num_batches" in n:
                assert torch.equal(c[3][n], e[3][n]), n
            else:
                assert_close(c[3][n], e[3][n], torch.float32, 60, f"{what} {n}")


def test_compile_dynamic_shapes_no_recompile_for_new_batch(device):
    """A new N, H or W under dynamic shapes reuses the compiled graph."""
    torch._dynamo.reset()
    m = make_module("official", 8, device).eval()
    counts = torch._dynamo.utils.counters
    counts.clear()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for shape in [(2, 8, 5, 6), (3, 8, 5, 6), (2, 8, 7, 9), (4, 8, 3, 11)]:
            x = torch.randn(shape, device=device)
            assert_close(cm(x), m(x), torch.float32, 64, f"dynamic {shape}")
    assert counts["stats"]["unique_graphs"] == 1, dict(counts["stats"])


@pytest.mark.parametrize("variant", ["timm", "ultralytics"])
def test_autocast_runs_in_autocast_dtype_and_matches_eager(variant, device):
    """Under torch.autocast(bfloat16) a float32 input runs in bfloat16 and the result
    matches the float64 reference evaluated on the bfloat16-rounded input."""
    m = make_module(variant, 16, device).eval()
    x = torch.randn(2, 16, 7, 6, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    ref = cbam_fused.cbam_reference(x.to(torch.bfloat16).double().cpu(), m.spec,
                                    copy.deepcopy(m).double().cpu().fused_weights())
    assert_close(out, ref, torch.bfloat16, 16 * 42, f"autocast {variant}")
    with torch.autocast(device.type, dtype=torch.bfloat16):  # eager PyTorch, same autocast
        eager = cbam_fused.cbam_reference(x.cpu(), m.spec, copy.deepcopy(m).cpu().fused_weights())
    assert_close(out, eager, torch.bfloat16, 16 * 42, f"autocast {variant} vs eager")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        direct = m(x.to(torch.bfloat16))
    assert torch.equal(direct, out)


class _NoHostSync:
    """Fails the test on anything that would synchronize with the device or depend on
    tensor data on the host: .item(), bool()/int()/float() of a tensor, .tolist(),
    .cpu()/.numpy() of a result."""
    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.Tensor, n, self._forbid(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)

    @staticmethod
    def _forbid(name):
        def f(*a, **k):
            raise AssertionError(f"host synchronization: Tensor.{name} called")
        return f


@pytest.mark.parametrize("variant", ["official", "timm", "ultralytics", "no_spatial"])
def test_forward_backward_never_synchronize(variant, device):
    """CUDA graph capture needs no host sync and no data-dependent allocation sizes:
    the whole forward+backward runs with every tensor-to-host path disabled."""
    m = make_module(variant, 16, device)
    x = torch.randn(2, 16, 6, 5, device=device, requires_grad=True)
    g = torch.randn_like(x)
    with _NoHostSync():
        out = m(x)
        out.backward(g)
    assert x.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_and_replay():
    m = make_module("official", 32, "cuda").eval()
    static_x = torch.randn(4, 32, 14, 14, device="cuda", requires_grad=True)
    static_g = torch.randn_like(static_x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compile the kernels outside the capture
            m(static_x).backward(static_g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_out = m(static_x)
        static_out.backward(static_g)
    new_x = torch.randn_like(static_x)
    static_x.data.copy_(new_x)
    graph.replay()
    xx = new_x.clone().requires_grad_()
    out = m(xx)
    out.backward(static_g)
    torch.testing.assert_close(static_out, out)


def test_autocast_fp16_dtype_is_the_autocast_one(device):
    if device.type == "cpu" and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    m = make_module("official", 8, device).eval()
    x = torch.randn(1, 8, 4, 4, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        out = m(x)
    assert out.dtype == torch.float16
    with torch.autocast(device.type, enabled=False):
        assert m(x).dtype == torch.float32


def test_weights_read_through_a_parametrization(device):
    """The forward reads weights from the module registries directly (modules.child and
    modules.tensor, for speed); a parametrized weight is not registered there and is
    read through its parametrization, gradients reaching the original parameters."""
    m = make_module("official", 8, device, reduction=2)
    torch.nn.utils.parametrizations.weight_norm(m.SpatialGate.spatial.conv)
    torch.nn.utils.parametrizations.weight_norm(m.ChannelGate.mlp[1])
    assert "weight" not in m.SpatialGate.spatial.conv._parameters
    x = torch.randn(2, 8, 5, 6, device=device)
    res = run_pair(m, x)
    check_pair(res, torch.float32, x.shape, "weight_norm")
    assert res["fused"]["grads"]["SpatialGate.spatial.conv.parametrizations.weight.original1"] is not None
