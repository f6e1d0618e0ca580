"""Patch description networks that are fully convolutional *and* exactly patch-local.

Every layer is a stride-1, unpadded ("valid") 3 x 3 convolution, dilated by 1, 2, 4, ... so that the
receptive field is exactly p x p (1 + 2 * sum(dilations) = p), followed by a 1 x 1 convolution to the
descriptor. Hence, on an image reflect-padded by p // 2, the dense output at (i, j) is bit-for-bit the
network applied to the p x p patch centred at (i, j) (up to float summation order): one pass gives a
descriptor for every pixel, as the paper's pooling + un-warping construction ("fast dense feature
extraction") does, without the strided layers that construction needs to undo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.backbones import IMAGENET_MEAN, IMAGENET_STD


def dilation_schedule(patch_size: int) -> list[int]:
    """Dilations of the 3 x 3 layers whose receptive field is exactly `patch_size` (odd, >= 3).

    Doubling dilations while they fit, then the remainder: 17 -> [1, 2, 4, 1], 33 -> [1, 2, 4, 8, 1],
    65 -> [1, 2, 4, 8, 16, 1]. Each dilation is at most the receptive field so far, so every pixel of the
    patch reaches the output (no gridding holes).
    """
    if patch_size < 3 or patch_size % 2 == 0:
        raise ValueError(f"patch size must be odd and >= 3, got {patch_size}")
    remaining, dilations, d = (patch_size - 1) // 2, [], 1
    while d <= remaining:
        dilations.append(d)
        remaining -= d
        d *= 2
    if remaining:
        dilations.append(remaining)
    return dilations


class PatchNet(nn.Module):
    """A p x p patch -> a `descriptor_dim` vector; applied to larger inputs it slides with stride 1.

    forward: (B, 3, H, W) in [0, 1] -> (B, D, H - p + 1, W - p + 1) (valid convolutions only).
    Inputs are normalised with the ImageNet mean/std inside, so teacher and students see the same thing.
    """

    def __init__(self, patch_size: int, channels: int, descriptor_dim: int, leaky_slope: float) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.descriptor_dim = descriptor_dim
        layers: list[nn.Module] = []
        in_ch = 3
        for d in dilation_schedule(patch_size):
            layers += [nn.Conv2d(in_ch, channels, 3, dilation=d), nn.LeakyReLU(leaky_slope)]
            in_ch = channels
        layers.append(nn.Conv2d(in_ch, descriptor_dim, 1))
        self.body = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body((images - self.mean) / self.std)


def pad_for_dense(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reflect-pad by p // 2 so the valid output has the input's size. (B, 3, H, W) -> (B, 3, H + p - 1, W + p - 1).

    Raises ValueError when the image is too small to reflect (H or W <= p // 2)."""
    pad = patch_size // 2
    if min(images.shape[-2:]) <= pad:
        raise ValueError(f"images {tuple(images.shape[-2:])} are too small for patch size {patch_size} "
                         f"(need more than {pad} px per side; lower detector.students.patch_sizes)")
    return F.pad(images, (pad, pad, pad, pad), mode="reflect")


def dense_descriptors(net: PatchNet, images: torch.Tensor) -> torch.Tensor:
    """A descriptor for every pixel in one pass. images (B, 3, H, W) -> (B, D, H, W)."""
    return net(pad_for_dense(images, net.patch_size))


def patch_descriptors(net: PatchNet, images: torch.Tensor, positions: list[tuple[int, int]]) -> torch.Tensor:
    """The reference, one patch at a time: the net on the p x p patch centred at each (row, col) of the
    reflect-padded image. images (B, 3, H, W) -> (B, len(positions), D)."""
    p = net.patch_size
    padded = pad_for_dense(images, p)
    out = [net(padded[:, :, r:r + p, c:c + p]).flatten(1) for r, c in positions]
    return torch.stack(out, dim=1)


def build_nets(patch_sizes: tuple[int, ...], channels: int, descriptor_dim: int, leaky_slope: float,
               seed: int) -> nn.ModuleDict:
    """One PatchNet per patch size, keyed "p<size>", initialised from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleDict({f"p{p}": PatchNet(p, channels, descriptor_dim, leaky_slope) for p in patch_sizes})
