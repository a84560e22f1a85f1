"""The benchmark matrix: which implementations, shapes, dtypes, layouts and directions.

One benchmark per (implementation, shape, dtype, layout, direction). Its pytest-benchmark
group is everything but the implementation, so each group is one comparison
(`--benchmark-group-by=group`, the default).

Shapes are the CBAM sites of the networks our users run:
- ResNet-50 with CBAM (one block per bottleneck, after conv3): 256x56x56, 512x28x28,
  1024x14x14, 2048x7x7, at N=1 (latency, inference) and N=64 (training batch);
- a 640x640 YOLO neck (P3/P4/P5 of the large models): 256x80x80, 512x40x40, 1024x20x20,
  at N=8.

Directions:
- "fwd": inference, the module in eval() and the call under torch.no_grad();
- "fwdbwd": a training step's share, the module in train() (BatchNorm on batch
  statistics), forward then backward with a gradient for the input and every parameter.

Marks, for selecting with -m:
- gpu: every case here (they skip without a CUDA device);
- compile: the torch.compile implementations (minutes of compilation each);
- headline: the README's table (bf16, the ResNet-50 sites at N=1 and N=64, both layouts,
  cbam_fused against eager timm and torch.compile max-autotune);
- quick: the short benchmark of `make gpu-check` (no compilation).

CBAM_BENCH_SHAPES=tiny replaces the shapes by one small shape, for the CPU plumbing test
(tests/test_benchmarks.py); it changes the ids, never the timing method.
"""
import dataclasses
import os

import pytest
import torch

RESNET50_SITES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
YOLO_SITES = [(256, 80, 80), (512, 40, 40), (1024, 20, 20)]
RESNET50_BATCHES = (1, 64)
YOLO_BATCH = 8
TINY_SHAPE = (2, 32, 8, 8)

# implementation name -> how it is built (implementations.py)
IMPLS = (
    "cbam_fused",            # timm CbamModule converted with cbam_fused.convert
    "timm",                  # eager timm.layers.cbam.CbamModule
    "official",              # eager module with the structure of the official CBAM
    "ultralytics",           # eager ultralytics.nn.modules.conv.CBAM (skips if not installed)
    "compile-default",       # torch.compile(timm CbamModule)
    "compile-max-autotune",  # torch.compile(timm CbamModule, mode="max-autotune"): CUDA graphs
    "cbam_fused-compile",    # torch.compile(cbam_fused module): the registered ops in a graph
)
COMPILED = ("compile-default", "compile-max-autotune", "cbam_fused-compile")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("nchw", "channels_last")
DIRECTIONS = ("fwd", "fwdbwd")

HEADLINE_IMPLS = ("cbam_fused", "timm", "compile-max-autotune")
QUICK_CASES = {((64, 256, 56, 56), "nchw"), ((64, 256, 56, 56), "channels_last"),
               ((64, 2048, 7, 7), "nchw"), ((1, 256, 56, 56), "nchw")}


def shapes():
    """[(N, C, H, W)]: the ResNet-50 sites at each batch, then the YOLO sites."""
    if os.environ.get("CBAM_BENCH_SHAPES") == "tiny":
        return [TINY_SHAPE]
    out = [(n, *site) for n in RESNET50_BATCHES for site in RESNET50_SITES]
    return out + [(YOLO_BATCH, *site) for site in YOLO_SITES]


def shape_str(shape):
    return "x".join(map(str, shape))


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    shape: tuple
    dtype: str
    layout: str
    direction: str

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def id(self):
        return f"{self.direction}-{self.dtype}-{self.layout}-{shape_str(self.shape)}-{self.impl}"

    @property
    def group(self):
        """Everything but the implementation: one comparison."""
        return f"{self.direction} {self.dtype} {self.layout} {shape_str(self.shape)}"

    @property
    def headline(self):
        return (self.dtype == "bf16" and self.impl in HEADLINE_IMPLS
                and self.shape[1:] in RESNET50_SITES and self.shape[0] in RESNET50_BATCHES)

    @property
    def quick(self):
        return (self.dtype == "bf16" and self.impl in ("cbam_fused", "timm")
                and (self.shape, self.layout) in QUICK_CASES)

    @property
    def x_bytes(self):
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def pass_bytes(self):
        """Bytes of x the fused design must move: 4|x| forward, 4|x| + 5|x| forward+backward
        (docs/design.md section 3). GB/s columns divide these by the measured times."""
        return (4 if self.direction == "fwd" else 9) * self.x_bytes


def matrix():
    """Every case, as pytest params with their marks, in group order."""
    params = []
    for direction in DIRECTIONS:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                for shape in shapes():
                    for impl in IMPLS:
                        case = Case(impl, shape, dtype, layout, direction)
                        marks = [pytest.mark.gpu]
                        if impl in COMPILED:
                            marks.append(pytest.mark.compile)
                        if case.headline:
                            marks.append(pytest.mark.headline)
                        if case.quick:
                            marks.append(pytest.mark.quick)
                        params.append(pytest.param(case, id=case.id, marks=marks))
    return params
