"""Pictures of what the CBAM blocks attend to, from `record_attention` (attention.py).

matplotlib is imported only when a figure is drawn, so the package does not need it.

    from cbam_fused.plot import attention_figure
    attention_figure(image, maps, "attention.png")          # image: [3, H, W] in [0, 1]

Left: the image with the spatial gate of one block (by default the last block that has a
spatial gate) upsampled to the image's size and laid over it. Right: the distribution of
the channel gate of every block, in forward order (median, quartiles, 5-95% whiskers).
"""
from typing import Optional

import torch
import torch.nn.functional as F


def spatial_overlay(image: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """The spatial gate [1, h, w] of one sample upsampled (bilinear) to the image's [H, W]."""
    H, W = image.shape[-2:]
    return F.interpolate(spatial[None].float(), size=(H, W), mode="bilinear",
                         align_corners=False)[0, 0]


def attention_figure(image: torch.Tensor, maps, path: str, block: Optional[str] = None,
                     sample: int = 0, title: Optional[str] = None) -> str:
    """Draw the figure described in the module docstring into `path` (PNG); returns path.

    image: [3, H, W] (or [H, W]) with values in [0, 1]; maps: the dict record_attention
    filled; block: the name of the block whose spatial gate is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("attention_figure: no attention maps were recorded")
    with_spatial = [name for name, m in maps.items() if m.spatial is not None]
    if block is None and with_spatial:
        block = with_spatial[-1]
    if block is not None and block not in maps:
        raise KeyError(f"attention_figure: no block named {block!r}; recorded: {list(maps)}")

    img = image.detach().float().cpu()
    img = img.permute(1, 2, 0) if img.dim() == 3 else img
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5),
                                      gridspec_kw=dict(width_ratios=[1, 1.6]))
    left.imshow(img.clamp(0, 1).numpy(), cmap=None if img.dim() == 3 else "gray")
    if block is not None and maps[block].spatial is not None:
        overlay = spatial_overlay(image, maps[block].spatial[sample].cpu())
        shown = left.imshow(overlay.numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        fig.colorbar(shown, ax=left, fraction=0.046, pad=0.04, label="spatial gate")
        left.set_title(f"spatial gate of {block or '<root>'}", fontsize=9)
    else:
        left.set_title("no spatial gate recorded", fontsize=9)
    left.axis("off")

    names = list(maps)
    gates = [maps[n].channel[sample].cpu().numpy() for n in names]
    right.boxplot(gates, whis=(5, 95), showfliers=False)
    right.set_xticks(range(1, len(names) + 1))
    right.set_xticklabels([n or "<root>" for n in names], rotation=70, fontsize=6)
    right.set_ylim(0, 1)
    right.set_ylabel("channel gate")
    right.set_title("channel gate per block (median, quartiles, 5-95%)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
