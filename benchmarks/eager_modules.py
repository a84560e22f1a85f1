"""Eager CBAM peers for the benchmark, written from the structure of the real modules
(docs/design.md section 2). The real timm CbamModule is used when timm is installed."""
import torch
import torch.nn.functional as F
from torch import nn


class OfficialCBAM(nn.Module):
    """Structure of Jongchan/attention-module CBAM: avg/max pools through one Linear MLP,
    then cat(max, mean) over channels -> 7x7 conv -> BatchNorm -> sigmoid."""

    def __init__(self, channels, reduction=16, kernel_size=7):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, channels))
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        H, W = x.shape[2:]
        avg = F.avg_pool2d(x, (H, W), stride=(H, W))
        mx = F.max_pool2d(x, (H, W), stride=(H, W))
        x = x * torch.sigmoid(self.mlp(avg) + self.mlp(mx))[:, :, None, None]
        pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class TimmLikeCBAM(nn.Module):
    """Structure of timm.layers.cbam.CbamModule (1x1-conv MLP without bias, amax pools,
    cat(mean, max) -> conv -> BatchNorm), for machines without timm."""

    def __init__(self, channels, rd_ratio=1 / 16, kernel_size=7):
        super().__init__()
        rd = max(1, round(channels * rd_ratio))
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=False)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=False)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        def mlp(v):
            return self.fc2(F.relu(self.fc1(v)))
        x = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


def eager_timm(channels):
    """(name, module): timm's CbamModule if importable, else the structural copy."""
    try:
        from timm.layers.cbam import CbamModule
        return "timm CbamModule", CbamModule(channels)
    except Exception:
        return "timm-like eager", TimmLikeCBAM(channels)
