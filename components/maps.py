"""Anomaly-map operations shared by the detectors: upsampling to the input size and Gaussian smoothing.

`to_input_resolution` runs bilinear upsampling and the Gaussian blur as one product per axis: both are
linear and separable, so upsample-then-blur of a patch map P (h, w) is exactly A_h @ P @ A_w^T with
A = blur (H, H) @ upsample (H, h). The (H, h) operators are built once per shape by applying the very same
`upsample`/`gaussian_blur` steps to an identity, so the result equals the two-step path up to float32
rounding (tests/unit/components/test_maps.py), at a fraction of the cost (a 33-tap blur of a 256 x 256 map becomes two
small matrix products).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def kernel_radius(sigma: float) -> int:
    return gaussian_kernel1d(sigma).numel() // 2


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
    """Patch scores on the feature grid (B, h, w) -> smoothed anomaly maps at the input size (B, H, W).

    Equal to gaussian_blur(upsample(patch_scores, size), sigma) up to float rounding, computed as
    A_h @ patch_scores @ A_w^T with the per-axis operators of `resize_blur_operator`.
    """
    a_h, a_w = resize_blur_operators(tuple(patch_scores.shape[-2:]), tuple(size), sigma)
    return torch.matmul(torch.matmul(a_h.to(patch_scores.dtype), patch_scores), a_w.to(patch_scores.dtype).T)


def resize_blur_operators(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-axis operators of `to_input_resolution` for a (h, w) grid and an (H, W) output:
    (A_h (H, h), A_w (W, w)) float64, the padding mode chosen as gaussian_blur chooses it. The exports hold
    them as constants."""
    (h, w), (out_h, out_w) = (int(grid[0]), int(grid[1])), (int(size[0]), int(size[1]))
    radius = kernel_radius(float(sigma)) if sigma > 0 else 0
    mode = "reflect" if min(out_h, out_w) > radius else "replicate"  # as gaussian_blur decides it
    return (resize_blur_operator(h, out_h, float(sigma), mode), resize_blur_operator(w, out_w, float(sigma), mode))


@functools.lru_cache(maxsize=32)
def resize_blur_operator(n_in: int, n_out: int, sigma: float, mode: str) -> torch.Tensor:
    """The linear map of one axis: bilinear resize n_in -> n_out (align_corners=False) followed by the 1-D
    Gaussian of `gaussian_blur` with `mode` padding -> (n_out, n_in) float64. Cached per shape; read-only."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in unit impulses (n_in, 1, n_in)
    x = eye if n_in == n_out else F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma).to(torch.float64)
        radius = kernel.numel() // 2
        x = F.conv1d(F.pad(x, (radius, radius), mode=mode), kernel.view(1, 1, -1))
    return x.squeeze(1).T.contiguous()


def top_mean(maps: torch.Tensor, ratio: float) -> torch.Tensor:
    """Image score: mean of the top `ratio` of each map's values (at least one). (B, H, W) -> (B,)."""
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * ratio))
    return torch.topk(flat, k, dim=1).values.mean(dim=1)

