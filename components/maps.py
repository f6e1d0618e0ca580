"""Anomaly-map operations shared by the detectors: upsampling to the input size and Gaussian smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius int(4 sigma + 0.5) as in scipy/anomalib -> (2r + 1,)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing with reflect padding. maps (B, H, W) -> (B, H, W); sigma 0 = identity."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of patch-grid scores. maps (B, h, w) -> (B, H, W)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def to_input_resolution(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Patch scores on the feature grid (B, h, w) -> smoothed anomaly maps at the input size (B, H, W)."""
    return gaussian_blur(upsample(patch_scores, size), sigma)

