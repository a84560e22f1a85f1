"""An ultralytics detection model built from a yaml with CBAM layers, converted: its
forward, fuse(), predict-style inference, a training step with the real detection loss,
checkpoint save and reload, unconvert, and export (ONNX, TorchScript), each against the
unconverted model.

ultralytics' parse_model tags every layer with .i, .f, .type and .np and its forward
reads them; parse_model looks layer names up in its module's namespace, so a yaml with
CBAM needs CBAM imported there (what users add to ultralytics/nn/tasks.py)."""
import copy

import pytest
import torch

import cbam_fused
from cbam_fused import convert, unconvert
from cbam_fused.convert import FusedUltralyticsCBAM

from helpers import assert_close
from model_helpers import randomize

tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics is not installed")
from ultralytics.nn.modules.conv import CBAM  # noqa: E402

YAML = {"nc": 2,
        "backbone": [[-1, 1, "Conv", [16, 3, 2]],
                     [-1, 1, "CBAM", [16, 7]],
                     [-1, 1, "Conv", [32, 3, 2]],
                     [-1, 1, "CBAM", [32, 3]],
                     [-1, 1, "Conv", [32, 3, 2]]],
        "head": [[[-1, 3], 1, "Detect", ["nc"]]]}
STEPS = 2 * 32 * 16 * 16  # the longest reduction inside the CBAM layers


@pytest.fixture
def cbam_in_yaml_namespace(monkeypatch):
    monkeypatch.setattr(tasks, "CBAM", CBAM, raising=False)


def _models(device, dtype=torch.float64):
    """(the yaml-built model, its converted copy)."""
    torch.manual_seed(0)
    model = randomize(tasks.DetectionModel(copy.deepcopy(YAML), ch=3, verbose=False))
    model = model.to(device=device, dtype=dtype)
    fused = convert(copy.deepcopy(model))
    assert [type(m) for m in fused.model if "CBAM" in type(m).__name__] == [FusedUltralyticsCBAM] * 2
    for a, b in zip(model.model, fused.model):
        assert (a.i, a.f, a.type, a.np) == (b.i, b.f, b.type, b.np)
    return model, fused


def _image(device, dtype=torch.float64, n=2):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def _predictions(model, x):
    with torch.no_grad():
        return model.eval()(x)[0]


def test_forward_predict_and_fuse(cbam_in_yaml_namespace, device):
    model, fused = _models(device)
    x = _image(device)
    assert_close(_predictions(fused, x), _predictions(model, x), torch.float64, STEPS, "predict")
    model.fuse(verbose=False)
    fused.fuse(verbose=False)
    assert fused.is_fused()
    assert_close(_predictions(fused, x), _predictions(model, x), torch.float64, STEPS, "fused")
    back = unconvert(fused)
    assert sum(isinstance(m, CBAM) for m in back.modules()) == 2
    assert_close(_predictions(back, x), _predictions(model, x), torch.float64, STEPS, "unconvert")


def _train_step(model, x):
    """One step of ultralytics' training: the detection loss on a batch, backward, SGD."""
    from ultralytics.cfg import get_cfg

    model.args = get_cfg()
    model.train()
    batch = {"img": x, "cls": torch.tensor([[0.0], [1.0], [1.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4],
                                     [0.5, 0.5, 0.5, 0.5]]),
             "batch_idx": torch.tensor([0.0, 0.0, 1.0])}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    loss, _ = model(batch)
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return loss.detach(), grads, copy.deepcopy(model.state_dict())


def test_training_step(cbam_in_yaml_namespace, device):
    model, fused = _models(device)
    x = _image(device)
    want, got = _train_step(model, x), _train_step(fused, x)
    assert_close(got[0], want[0], torch.float64, STEPS, "detection loss")
    assert list(got[1]) == list(want[1]) and list(got[2]) == list(want[2])
    for n in want[1]:
        assert_close(got[1][n], want[1][n], torch.float64, STEPS, f"grad {n}")
    for n in want[2]:
        if want[2][n].is_floating_point():
            assert_close(got[2][n], want[2][n], torch.float64, STEPS, f"after the step: {n}")


def test_checkpoint_save_and_reload(cbam_in_yaml_namespace, device, tmp_path):
    """ultralytics' checkpoint: the pickled model in half precision, loaded back with
    load_checkpoint (FP32, eval); and the state dict into a freshly built model."""
    model, fused = _models(device, torch.float32)
    path = tmp_path / "last.pt"
    torch.save({"model": copy.deepcopy(fused).half(), "train_args": {}}, path)
    loaded, _ = tasks.load_checkpoint(str(path), device=device)
    assert sum(isinstance(m, cbam_fused.FusedCBAMBase) for m in loaded.modules()) == 2
    rounded = copy.deepcopy(model).half().double()  # the weights the checkpoint holds
    x = _image(device, torch.float32)
    assert_close(_predictions(loaded, x), _predictions(rounded, x.double()), torch.float32, STEPS,
                 "reloaded checkpoint")
    fresh = tasks.DetectionModel(copy.deepcopy(YAML), ch=3, verbose=False).to(device)
    fresh.load_state_dict(fused.state_dict())
    assert_close(_predictions(fresh, x), _predictions(fused, x), torch.float32, STEPS,
                 "state dict into a fresh model")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_ultralytics_export(fmt, cbam_in_yaml_namespace, device, tmp_path, monkeypatch):
    """YOLO(yaml).export(...) of the converted model: the exported file runs (onnxruntime,
    torch.jit.load) and gives the unconverted model's predictions."""
    import yaml
    from ultralytics import YOLO

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cbam-tiny.yaml").write_text(yaml.safe_dump(YAML))
    yolo = YOLO(str(tmp_path / "cbam-tiny.yaml"))
    randomize(yolo.model)
    original = copy.deepcopy(yolo.model).float().eval()
    yolo.model = convert(yolo.model)
    exported = yolo.export(format=fmt, imgsz=64, device="cpu", batch=2)
    x = _image("cpu", torch.float32)
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        out = torch.jit.load(exported)(x)
        got = out[0] if isinstance(out, (tuple, list)) else out
    want = _predictions(copy.deepcopy(original).fuse(verbose=False).double(), x.double())
    assert_close(got, want, torch.float32, STEPS, f"exported {fmt}")
