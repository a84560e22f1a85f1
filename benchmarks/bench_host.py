"""Host-side cost of a fused block call, measured on any machine (no GPU needed).

The Triton kernels are replaced by stubs (stubs.py), so what is timed is the Python
around the launches: plan lookup, workspace allocation and carving, argument assembly,
input checks, the autograd.Function. Triton's own launch cost comes on top; on a GPU the
block benchmarks report it inside the host enqueue time (extra_info["host_us"]).
Tensors are CUDA tensors where a GPU exists, else CPU tensors (the interpreter flag set
by conftest.py sends them down the kernel path). The torch.library cases run the
registered op on meta tensors: the dispatcher and the fake implementation, no kernel.

The glue, module and training-step cases run on each launch path (cbam_fused/launch.py):
`jit` (Triton's JIT launch, the default: workspace regions as tensor views) and `fast`
(the opt-in replay of compiled kernels: regions as device addresses, no views; its first
call captures, outside the timing).

Shape: bf16 8x256x28x28, the timm variant (mean+max pools, no MLP bias, BatchNorm).
"""
import pytest
import torch

from cbam_fused import CBAM, ops
from cbam_fused.function import fused_backward, fused_forward, plan_for
from cbam_fused.launchers import dense_layout
from cbam_fused.plan import block_plan
from stubs import stubbed_kernels

pytestmark = pytest.mark.host

SHAPE = (8, 256, 28, 28)
TIMM_SPEC = dict(spatial_pool="mean,max", mlp_bias=False, bn_momentum=0.1, max_mode="amax")


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def block():
    """(module in train mode, its fused weights, x in the kernels' layout, p_contig)."""
    m = CBAM(SHAPE[1], **TIMM_SPEC).to(_device()).train()
    x = torch.randn(SHAPE, dtype=torch.bfloat16, device=_device())
    xd, p_contig = dense_layout(x)
    return m, m.fused_weights(), xd, p_contig


@pytest.fixture(params=["jit", "fast"])
def stubs(request):
    """[launch count], with the kernels stubbed, on the launch path of the param."""
    with stubbed_kernels(fast=request.param == "fast") as launches:
        yield launches


def _plan_key(m, w, xd, p_contig):
    plan = plan_for(xd, m.spec, w, p_contig)
    return (plan.N, plan.C, plan.H, plan.W, plan.hidden, plan.two_layers, plan.spatial,
            plan.kernel_size, plan.p_contig, plan.dtype, 132)


@pytest.mark.benchmark(group="host-launch-plan")
def test_plan_new_shape(benchmark, block):
    """Planning a shape seen for the first time (then cached)."""
    key = _plan_key(*block)
    benchmark(block_plan.__wrapped__, *key)


@pytest.mark.benchmark(group="host-launch-plan")
def test_plan_cached(benchmark, block):
    m, w, xd, p_contig = block
    benchmark(plan_for, xd, m.spec, w, p_contig)


@pytest.mark.benchmark(group="host-forward-stubbed")
def test_forward_glue(benchmark, block, stubs):
    m, w, xd, p_contig = block
    fused_forward(xd, p_contig, m.spec, w, True, 0.1)
    benchmark.extra_info["launches"] = stubs[0]
    benchmark(fused_forward, xd, p_contig, m.spec, w, True, 0.1)


@pytest.mark.benchmark(group="host-forward-stubbed")
def test_module_forward_inference(benchmark, block, stubs):
    """Module call in eval mode under no_grad: input checks, dispatch, the glue."""
    m, _, xd, _ = block
    m.eval()

    def call():
        with torch.no_grad():
            return m(xd)
    benchmark(call)


@pytest.mark.benchmark(group="host-backward-stubbed")
def test_backward_glue(benchmark, block, stubs):
    m, w, xd, p_contig = block
    out, saved_acc, saved_i32 = fused_forward(xd, p_contig, m.spec, w, True, 0.1)
    stubs[0] = 0
    fused_backward(out, xd, p_contig, saved_acc, saved_i32, m.spec, w, True, True)
    benchmark.extra_info["launches"] = stubs[0]
    benchmark(fused_backward, out, xd, p_contig, saved_acc, saved_i32, m.spec, w, True, True)


@pytest.mark.benchmark(group="host-training-step-stubbed")
def test_module_forward_backward(benchmark, block, stubs):
    """Module forward+backward in train mode through autograd (gradients reset to None
    before each round, untimed, as zero_grad(set_to_none=True) does once per step)."""
    m, _, xd, _ = block
    x = xd.detach().requires_grad_()
    g = torch.ones_like(x)

    def reset():
        m.zero_grad(set_to_none=True)
        x.grad = None
    benchmark.pedantic(lambda: m(x).backward(g), setup=reset, rounds=2000, warmup_rounds=50)


def _meta_forward_args():
    m = CBAM(SHAPE[1], **TIMM_SPEC).to("meta").train()
    w = m.fused_weights()
    x = torch.empty(SHAPE, device="meta", dtype=torch.bfloat16)
    # the argument order of ops._Registered.block_forward, from the same helpers
    return (x, *ops._weights_args(w), w.bn_running_mean, w.bn_running_var,
            w.bn_num_batches_tracked, True, *ops._variant(m.spec, w.has_bn), True, 0.1)


@pytest.mark.benchmark(group="host-library-dispatch-meta")
def test_fake_forward_direct(benchmark):
    """The fake implementation called as a function: the baseline of the next case."""
    benchmark(ops._FAKES["block_forward"], *_meta_forward_args())


@pytest.mark.benchmark(group="host-library-dispatch-meta")
def test_registered_forward(benchmark):
    """The registered op on meta tensors: dispatcher + fake. Eager calls skip it
    (function.passes()); compiled graphs call it."""
    benchmark(ops.OPS_RAW.block_forward, *_meta_forward_args())
