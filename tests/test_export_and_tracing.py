"""Tools that record or transform a model's operations, on converted models:
torch.jit.trace, torch.onnx.export (TorchScript-based and dynamo) run in onnxruntime,
torch.fx.symbolic_trace and create_feature_extractor (torchvision, timm), torch.export,
torch.jit.script (a clear error), torch.func (vmap, grad), and the workflows that already
worked (pickle, functional_call). Every result is checked against the float64 original."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import cbam_fused
from cbam_fused import convert, unconvert

from helpers import UNIT_ROUNDOFF, assert_close
from model_helpers import randomize

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule  # noqa: E402


def _resnet18_cbam():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=10)
    return randomize(model).eval()


def _check_against_original(original, got, x, what):
    """`got` (the output of some form of the converted model on x) vs the unconverted
    model in float64; the conditioning run is the original in fp32 on x perturbed by one
    unit roundoff."""
    want = copy.deepcopy(original).double()(x.double())
    plain = copy.deepcopy(original)((x.double() * (1 + UNIT_ROUNDOFF[torch.float32])).float())
    assert_close(torch.as_tensor(got), want, torch.float32, 2 * 512 * 16, what, plain)


def test_jit_trace(device):
    original = _resnet18_cbam().to(device)
    fused = convert(copy.deepcopy(original))
    traced = torch.jit.trace(fused, torch.randn(1, 3, 32, 32, device=device))
    assert "cbam_fused::" not in str(traced.inlined_graph)
    x = torch.randn(2, 3, 32, 32, device=device)  # another batch size than the trace's
    with torch.no_grad():
        _check_against_original(original, traced(x).detach(), x, "jit.trace")


def _onnx_model(model, x, path, dynamo):
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"],
                      dynamic_axes=None if dynamo else {"x": {0: "n"}},
                      dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=8)}}
                      if dynamo else None)
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(path)).graph
    assert not any("cbam" in (n.domain + n.op_type).lower() for n in graph.node)
    return path


def _onnxruntime(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_of_a_timm_model_runs_in_onnxruntime(dynamo, tmp_path, device):
    original = _resnet18_cbam()
    fused = convert(copy.deepcopy(original)).to(device)
    path = _onnx_model(fused, torch.randn(2, 3, 32, 32, device=device), tmp_path / "m.onnx",
                       dynamo)
    x = torch.randn(3, 3, 32, 32)
    _check_against_original(original, _onnxruntime(path, x), x, f"onnx dynamo={dynamo}")


def _small_net():
    return randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CbamModule(8, rd_ratio=0.25),
                                   nn.Conv2d(8, 4, 1)))


def test_fx_symbolic_trace_keeps_the_block_as_a_leaf(device):
    """The block is one call_module node: the GraphModule runs the fused block itself, so it
    follows train()/eval() and updates the BatchNorm statistics like the original."""
    original = _small_net().double().to(device).train()
    fused = convert(copy.deepcopy(original))
    gm = torch.fx.symbolic_trace(fused)
    nodes = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert nodes == [("call_module", "0"), ("call_module", "1"), ("call_module", "2")]
    assert isinstance(gm.get_submodule("1"), cbam_fused.FusedCBAMBase)
    for train in (True, False):
        original.train(train)
        gm.train(train)
        x = torch.randn(2, 3, 6, 7, dtype=torch.float64, device=device)
        assert_close(gm(x), original(x), torch.float64, 8 * 42, f"fx train={train}")
    for (n, a), (_, b) in zip(original.named_buffers(), gm.named_buffers()):
        assert torch.equal(a, b) if "num_batches" in n else \
            bool((a - b).abs().max() < 1e-12), f"fx BatchNorm state {n}"


def test_fx_symbolic_trace_of_a_lone_block(device):
    block = convert(randomize(CbamModule(8, rd_ratio=0.25)).double().to(device).eval())
    gm = torch.fx.symbolic_trace(block)
    ops = [n.op for n in gm.graph.nodes]
    assert ops.count("call_function") == 1 and "get_attr" in ops
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, device=device)
    assert torch.equal(gm(x), block(x))


def test_torchvision_create_feature_extractor(device):
    from torchvision.models.feature_extraction import create_feature_extractor

    original = _small_net().double().to(device).eval()
    fused = convert(copy.deepcopy(original))
    extractor = create_feature_extractor(fused, return_nodes={"1": "attended", "2": "out"})
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, device=device)
    feats = extractor(x)
    assert_close(feats["attended"], original[1](original[0](x)), torch.float64, 8 * 42, "attended")
    assert_close(feats["out"], original(x), torch.float64, 8 * 42, "out")


def test_timm_create_feature_extractor(device):
    from timm.models import create_feature_extractor

    original = _resnet18_cbam().to(device)
    fused = convert(copy.deepcopy(original))
    extractor = create_feature_extractor(fused, return_nodes=["layer1", "layer4"])
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        feats = extractor(x)
        ref = copy.deepcopy(original).double()
        x64 = x.double()
        layer1 = ref.layer1(ref.maxpool(ref.act1(ref.bn1(ref.conv1(x64)))))
        layer4 = ref.layer4(ref.layer3(ref.layer2(layer1)))
    assert_close(feats["layer1"], layer1, torch.float32, 2 * 64 * 64, "timm features layer1")
    assert_close(feats["layer4"], layer4, torch.float32, 2 * 512 * 16, "timm features layer4")


def test_torch_export_keeps_the_fused_op(device):
    original = _small_net().to(device).eval()
    fused = convert(copy.deepcopy(original))
    x = torch.randn(2, 3, 6, 7, device=device)
    ep = torch.export.export(fused, (x,))
    assert "cbam_fused.block_forward" in str(ep.graph)
    x2 = torch.randn(2, 3, 6, 7, device=device)
    assert_close(ep.module()(x2), original.double()(x2.double()), torch.float32, 8 * 42, "export")


def test_jit_script_fails_with_what_to_do():
    fused = convert(_small_net())
    with pytest.raises(RuntimeError, match=r"cbam_fused: torch.jit.script .*unconvert"):
        torch.jit.script(fused)
    scripted = torch.jit.script(unconvert(copy.deepcopy(fused)))   # the advice works
    assert isinstance(fused[1], cbam_fused.FusedCBAMBase)          # and leaves fused alone
    fused.eval()
    scripted.eval()
    x = torch.randn(2, 3, 6, 7)
    assert_close(fused(x), scripted(x), torch.float32, 8 * 42, "scripted vs fused")


def test_vmap_and_func_grad(device):
    """torch.func transforms run the block as plain PyTorch ops, with the same values."""
    block = convert(randomize(CbamModule(8, rd_ratio=0.25)).double().to(device).eval())
    ref = unconvert(copy.deepcopy(block))
    xs = torch.randn(3, 2, 8, 4, 5, dtype=torch.float64, device=device)
    got = torch.vmap(block)(xs)
    for i in range(3):
        assert_close(got[i], ref(xs[i]), torch.float64, 8 * 20, f"vmap sample {i}")
    x = xs[0]
    gx = torch.func.grad(lambda t: block(t).square().sum())(x)
    xr = x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    assert_close(gx, xr.grad, torch.float64, 8 * 20, "func.grad")


def test_pickle_and_functional_call(device):
    original = _small_net().double().to(device).train()
    fused = convert(copy.deepcopy(original))
    restored = pickle.loads(pickle.dumps(fused))
    assert isinstance(restored[1], cbam_fused.FusedCBAMBase)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    params = {n: p * 1.5 for n, p in original.named_parameters()}
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, device=device)
    want = torch.func.functional_call(copy.deepcopy(original), params, (x,))
    for model in (restored, loaded):
        got = torch.func.functional_call(model, params, (x,))
        assert_close(got, want, torch.float64, 8 * 42, "functional_call")
