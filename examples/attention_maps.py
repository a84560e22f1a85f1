"""Draw what the CBAM blocks of a timm ResNet-50 attend to.

    python examples/attention_maps.py [--checkpoint CKPT] [--out attention.png] [--device cuda]

Builds timm's resnet50 with CBAM blocks (block_args=dict(attn_layer="cbam")), loads your
checkpoint if you give one (a state dict saved from that model; without one the weights
are random, the CBAM weights are drawn at random too, and the picture shows untrained
gates), converts the model with
cbam_fused.convert, runs one image through it with cbam_fused.record_attention, and
writes the figure of cbam_fused.plot.attention_figure. The image is a synthetic scene
made here (or an image file of yours with --image): nothing is downloaded.

On a CPU without TRITON_INTERPRET=1 the fused blocks run their plain PyTorch path, which
records the same gates; on a GPU they run the Triton kernels.
"""
import argparse
import math

import torch

import cbam_fused
from cbam_fused.plot import attention_figure

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def synthetic_scene(size: int = 224) -> torch.Tensor:
    """A [3, size, size] image in [0, 1]: a sky-to-ground gradient, a red disk, a blue
    square and a yellow stripe, so the gates have something to pick out."""
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    img = torch.stack([0.35 + 0.3 * yy, 0.55 + 0.2 * yy, 0.9 - 0.5 * yy])
    disk = ((xx - 0.3) ** 2 + (yy - 0.35) ** 2) < 0.12 ** 2
    square = ((xx - 0.72).abs() < 0.1) & ((yy - 0.62).abs() < 0.1)
    stripe = (yy - 0.85 - 0.03 * torch.sin(xx * 4 * math.pi)).abs() < 0.025
    for mask, color in ((disk, (0.9, 0.1, 0.1)), (square, (0.1, 0.2, 0.85)),
                        (stripe, (0.95, 0.85, 0.1))):
        img[:, mask] = torch.tensor(color)[:, None]
    return img.clamp(0, 1)


def load_image(path: str, size: int) -> torch.Tensor:
    import matplotlib.image as mpimg
    img = torch.from_numpy(mpimg.imread(path).copy()).float()
    img = img[..., :3].permute(2, 0, 1) if img.dim() == 3 else img[None].expand(3, -1, -1)
    if img.max() > 1:
        img = img / 255.0
    return torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear",
                                           align_corners=False)[0].clamp(0, 1)


def randomize_cbam(model, seed=0):
    """Random CBAM weights (fixed seed), so the untrained gates are not all 0.5 (timm
    initializes them that way): a stand-in until you pass a checkpoint."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, cbam_fused.FusedCBAMBase):
                for name, p in block.named_parameters():
                    if p.dim() > 1:
                        fan_in = p[0].numel()
                        p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="state dict of timm resnet50 with attn_layer='cbam'")
    p.add_argument("--image", help="an image file (PNG) instead of the synthetic scene")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--block", help="the block whose spatial gate is drawn (default: the first)")
    p.add_argument("--out", default="attention.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    import timm
    # zero_init_last=False: timm zeroes each block's last BatchNorm by default, so an
    # untrained model would feed its CBAM blocks zeros (every gate 0.5)
    model = timm.create_model("resnet50", block_args=dict(attn_layer="cbam"), pretrained=False,
                              zero_init_last=False)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model = cbam_fused.convert(model)
    if not args.checkpoint:
        randomize_cbam(model)
    model = model.to(args.device).eval()
    image = load_image(args.image, args.size) if args.image else synthetic_scene(args.size)
    x = ((image - MEAN) / STD)[None].to(args.device)
    with cbam_fused.record_attention(model) as maps, torch.no_grad():
        model(x)
    title = "timm resnet50-CBAM, " + ("checkpoint " + args.checkpoint if args.checkpoint
                                      else "random weights, random CBAM gates (no checkpoint)")
    block = args.block or next(iter(maps))  # the first block: the finest spatial gate
    path = attention_figure(image, maps, args.out, block=block, title=title)
    print(f"{len(maps)} CBAM blocks recorded; figure written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
