"""convert(model) against the real timm and ultralytics classes and an official-structure
CBAM: same function in train and eval mode, same gradients, same BatchNorm updates, same
state-dict keys and tensors, and a way back."""
import copy

import pytest
import torch
from torch import nn

from cbam_fused import convert, unconvert
from cbam_fused.convert import FusedOfficialCBAM, FusedTimmCbam, FusedUltralyticsCBAM

from helpers import assert_close
from model_helpers import compare_models, randomize, ultralytics_cbam
from official_cbam import CBAM as OfficialCBAM

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule, LightCbamModule  # noqa: E402


def freeze_outer_batchnorm(model):
    """Put every BatchNorm outside the CBAM blocks in eval mode. A ResNet on a tiny
    input in training mode normalizes over a handful of values per channel and turns
    rounding noise into O(1) changes (measured: a 1e-13 input change moves a resnet50's
    output by 50% at 2x3x16x16); the CBAM blocks under test stay in training mode."""
    cbam_types = (CbamModule, LightCbamModule)
    inside = {id(b) for m in model.modules() if isinstance(m, cbam_types) for b in m.modules()}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and id(m) not in inside:
            m.eval()
    return model


# (network, attn_layer, block class, blocks, input side, reduction length in the CBAM
# blocks). float64 and fp32, train and eval, split over the two networks to bound the
# interpreter's time (each resnet50 pass runs 16 blocks x 6 Triton launches).
RESNET50_CBAM = ("resnet50", "cbam", CbamModule, 16, 32, 2 * 256 * 8 * 8)
RESNET18_LCBAM = ("resnet18", "lcbam", LightCbamModule, 8, 48, 2 * 64 * 12 * 12)


@pytest.mark.parametrize("net,dtype,train", [
    (RESNET50_CBAM, torch.float64, True), (RESNET50_CBAM, torch.float32, False),
    (RESNET18_LCBAM, torch.float32, True), (RESNET18_LCBAM, torch.float64, False)],
    ids=["resnet50-cbam-f64-train", "resnet50-cbam-f32-eval", "resnet18-lcbam-f32-train",
         "resnet18-lcbam-f64-eval"])
def test_timm_resnets(net, dtype, train, device):
    name, attn, block, blocks, side, steps_len = net
    model = timm.create_model(name, block_args=dict(attn_layer=attn), num_classes=10)
    assert sum(isinstance(m, block) for m in model.modules()) == blocks
    compare_models(model, lambda: torch.randn(2, 3, side, side), dtype=dtype, train=train,
                   device=device, what=f"{name}-{attn} {dtype} train={train}",
                   steps_len=steps_len, prepare=freeze_outer_batchnorm)


TIMM_OPTIONS = [dict(mlp_bias=True), dict(rd_ratio=1 / 8), dict(rd_channels=5),
                dict(rd_ratio=1 / 4, rd_divisor=4), dict(spatial_kernel_size=3),
                dict(spatial_kernel_size=5, mlp_bias=True)]


@pytest.mark.parametrize("light", [False, True])
@pytest.mark.parametrize("opts", TIMM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_timm_module_options(opts, light, device):
    cls = LightCbamModule if light else CbamModule
    compare_models(nn.Sequential(cls(40, **opts)), lambda: torch.randn(3, 40, 6, 7),
                   dtype=torch.float32, train=True, device=device, what=f"{cls.__name__} {opts}",
                   steps_len=40 * 42)


@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("train", [True, False])
def test_ultralytics_cbam(kernel_size, train, device):
    compare_models(nn.Sequential(ultralytics_cbam()(24, kernel_size)),
                   lambda: torch.randn(2, 24, 9, 8), dtype=torch.float32, train=train,
                   device=device, what=f"ultralytics k={kernel_size}", steps_len=24 * 72)


@pytest.mark.parametrize("opts", [dict(), dict(no_spatial=True), dict(pool_types=("avg",)),
                                  dict(pool_types=("max", "avg"))], ids=str)
@pytest.mark.parametrize("train", [True, False])
def test_official_cbam(opts, train, device):
    compare_models(nn.Sequential(OfficialCBAM(32, 4, **opts)), lambda: torch.randn(2, 32, 6, 6),
                   dtype=torch.float32, train=train, device=device, what=f"official {opts}",
                   steps_len=32 * 36)


def test_report_names_unsupported_and_counts():
    model = nn.Sequential(CbamModule(32), OfficialCBAM(32, 4, pool_types=("avg", "lp")),
                          ultralytics_cbam()(32, 7), OfficialCBAM(32, 4),
                          nn.Sequential(LightCbamModule(32)))
    model, report = convert(model, return_report=True)
    assert [type(m) for m in model][:4] == [FusedTimmCbam, OfficialCBAM, FusedUltralyticsCBAM,
                                             FusedOfficialCBAM]
    assert isinstance(model[4][0], FusedTimmCbam)
    assert len(report.replaced) == 4
    assert report.skipped == [("1", "CBAM", "pool_types ['avg', 'lp']: only ['avg', 'max'] and "
                                            "['avg'] are fused")]
    assert "replaced 4" in str(report) and "lp" in str(report)


def test_sync_batchnorm_block_is_converted(device):
    """A SyncBatchNorm in the spatial branch is fused (its statistics are synchronized
    across processes in tests/test_distributed.py); in one process it is a BatchNorm."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(CbamModule(16)))
    model, report = convert(model, return_report=True)
    assert isinstance(model[0], FusedTimmCbam) and not report.skipped
    assert isinstance(model[0].spatial.conv.bn, nn.SyncBatchNorm)


def test_state_dict_round_trip_and_shared_tensors():
    original = randomize(timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=10))
    before = {k: v.clone() for k, v in original.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in original.state_dict().items()}
    fused = convert(original)
    sd = fused.state_dict()
    assert list(sd) == list(before)
    assert all(sd[k].data_ptr() == ptrs[k] for k in sd), "converted model must share tensors"
    fresh = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=10)
    fresh.load_state_dict(sd)                      # converted checkpoint -> plain model
    convert(fresh).load_state_dict(before)         # plain checkpoint -> converted model
    back = unconvert(fused)
    assert sum(isinstance(m, CbamModule) for m in back.modules()) == 8
    assert all(back.state_dict()[k].data_ptr() == ptrs[k] for k in ptrs)


def test_sgd_steps_track_original(device):
    UltralyticsCBAM = ultralytics_cbam()

    def net():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), CbamModule(16),
                             nn.Conv2d(16, 16, 3, padding=1), UltralyticsCBAM(16, 3),
                             OfficialCBAM(16, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 5))
    torch.manual_seed(3)
    plain = randomize(net()).double().to(device)
    fused = convert(copy.deepcopy(plain))
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=device)
        y = torch.randint(0, 5, (4,), device=device)
        for model, opt in ((plain, opt_p), (fused, opt_f)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (n, a), (_, b) in zip(plain.state_dict().items(), fused.state_dict().items()):
        if a.is_floating_point():
            assert_close(b, a, torch.float64, 10 ** 6, f"after 4 SGD steps: {n}")


@pytest.mark.parametrize("kind", ["timm", "ultralytics", "official"])
def test_ties_follow_the_source(kind, device):
    """After a ReLU whole channels are zero: timm splits the max gradient among ties
    (amax), ultralytics and the official code give it to the first maximum."""
    block = {"timm": lambda: CbamModule(16), "ultralytics": lambda: ultralytics_cbam()(16, 7),
             "official": lambda: OfficialCBAM(16, 4)}[kind]()

    def make():
        x = torch.randn(2, 16, 6, 6).relu()
        x[:, ::2] = 0.0
        return x
    compare_models(nn.Sequential(block), make, dtype=torch.float64, train=True, device=device,
                   what=f"ties {kind}", steps_len=16 * 36)


def test_deterministic_algorithms(device):
    model = convert(nn.Sequential(CbamModule(16), OfficialCBAM(16, 4), ultralytics_cbam()(16)))
    model.to(device)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
        model(x).sum().backward()
        first = x.grad.clone()
        x.grad = None
        model(x).sum().backward()
        assert torch.equal(first, x.grad)
    finally:
        torch.use_deterministic_algorithms(was)
