"""The spatial BatchNorm behaves exactly like nn.BatchNorm2d: batch statistics in training,
running statistics in eval, the same running-stat updates and batch counter.

The eager side runs the module's own submodules (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
on a deep copy, so nn.BatchNorm2d.forward itself defines the expected state."""
import copy

import pytest
import torch

from helpers import assert_close, make_module


def eager_official(m, x):
    """The official CBAM forward on m's own submodules (float64)."""
    mlp = m.ChannelGate.mlp
    z = mlp(x.mean((2, 3))) + mlp(x.flatten(2).max(2).values)
    y = x * torch.sigmoid(z)[:, :, None, None]
    pooled = torch.cat([y.max(1, keepdim=True).values, y.mean(1, keepdim=True)], 1)
    sp = m.SpatialGate.spatial
    return y * torch.sigmoid(sp.bn(sp.conv(pooled)))


@pytest.mark.parametrize("momentum", [0.01, 0.3, None])
@pytest.mark.parametrize("track", [True, False])
def test_running_stats_match_batchnorm2d(momentum, track, device):
    m = make_module("official", 12, device)
    bn = m.SpatialGate.spatial.bn
    bn.momentum = momentum
    if not track:
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    eager = copy.deepcopy(m).double().cpu()
    for step in range(3):
        x = torch.randn(2, 12, 5, 6, device=device)
        out = m(x)
        ref = eager_official(eager, x.double().cpu())
        assert_close(out, ref, torch.float32, 30 * 4, f"step {step} out")
    for (name, b), (_, e) in zip(m.named_buffers(), eager.named_buffers()):
        if "num_batches" in name:
            assert int(b) == int(e) == 3
        else:
            assert_close(b, e, torch.float32, 60, name)


def test_eval_uses_running_stats_and_changes_nothing(device):
    m = make_module("official", 12, device).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    eager = copy.deepcopy(m).double().cpu()
    x = torch.randn(2, 12, 5, 6, device=device)
    assert_close(m(x), eager_official(eager, x.double().cpu()), torch.float32, 120, "eval out")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cpu_without_interpreter_runs_reference():
    """Without TRITON_INTERPRET a CPU tensor takes the plain PyTorch path, same numbers."""
    import os
    import subprocess
    import sys
    script = (
        "import torch, copy\n"
        "from cbam_fused import CBAM, uses_kernels\n"
        "from cbam_fused.reference import cbam_reference\n"
        "torch.manual_seed(0)\n"
        "m = CBAM(8, reduction=2)\n"
        "x = torch.randn(2, 8, 5, 5)\n"
        "assert not uses_kernels(x)\n"
        "e = copy.deepcopy(m).double()\n"
        "out = m(x)\n"
        "ref = cbam_reference(x.double(), e.spec, e.fused_weights(), bn_training=True, bn_momentum=0.01)\n"
        "err = float((out.double() - ref).abs().max())\n"
        "assert err < 1e-5, err\n"
        "assert torch.allclose(m.SpatialGate.spatial.bn.running_mean.double(), "
        "e.SpatialGate.spatial.bn.running_mean, atol=1e-6)\n"
        "print('ok', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
