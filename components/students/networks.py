"""Patch description networks that are fully convolutional *and* exactly patch-local.

Every layer is a stride-1, unpadded ("valid") 3 x 3 convolution, dilated by 1, 2, 4, ... so that the
receptive field is exactly p x p (1 + 2 * sum(dilations) = p), followed by a 1 x 1 convolution to the
descriptor. Hence, on an image reflect-padded by p // 2, the dense output at (i, j) is bit-for-bit the
network applied to the p x p patch centred at (i, j) (up to float summation order): one pass gives a
descriptor for every pixel, as the paper's pooling + un-warping construction ("fast dense feature
extraction") does, without the strided layers that construction needs to undo.

Stride 2 (`dense_stride: 2`, declared, a CPU-cost choice): the same exact p x p receptive field, evaluated
only at every other row and column. The first two 3 x 3 layers have dilation 1 and the second runs with
stride 2; every later layer's dilation is even in input pixels (so, on the half-resolution grid, it is half
that), which is why only even positions of each layer are ever needed. The descriptor at output (i, j) is the
network on the p x p patch centred at input (2i, 2j): a quarter of the positions and about a quarter of the
work after the first layer. Patch sizes must then be 1 (mod 4) and >= 9 (17, 33, 65 are).
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


def layer_plan(patch_size: int, stride: int = 1) -> list[tuple[int, int]]:
    """(dilation, stride) of each 3 x 3 layer; the receptive field is exactly `patch_size` in input pixels.

    stride 1: dilation_schedule with stride 1 everywhere. stride 2: (1, 1), (1, 2), then the doubling schedule
    of the remaining half-resolution reach: 17 -> [(1, 1), (1, 2), (1, 1), (2, 1)], 33 -> [..., (4, 1)]."""
    if stride == 1:
        return [(d, 1) for d in dilation_schedule(patch_size)]
    if stride != 2:
        raise ValueError(f"dense stride must be 1 or 2, got {stride}")
    if patch_size < 9 or patch_size % 4 != 1:
        raise ValueError(f"patch size {patch_size} with dense stride 2 must be 1 (mod 4) and >= 9 (e.g. 17, 33, 65)")
    return [(1, 1), (1, 2)] + [(d, 1) for d in dilation_schedule(patch_size // 2 - 1)]


def dense_size(side: int, stride: int) -> int:
    """Output side of the dense maps for an input side (one descriptor per `stride` pixels)."""
    return -(-side // stride)


class PatchNet(nn.Module):
    """A p x p patch -> a `descriptor_dim` vector; applied to larger inputs it slides with stride 1.

    forward: (B, 3, H, W) in [0, 1] -> (B, D, (H - p) // s + 1, (W - p) // s + 1) (valid convolutions only;
    s = `stride`). Inputs are normalised with the ImageNet mean/std inside, so teacher and students see the
    same thing.
    """

    def __init__(self, patch_size: int, channels: int, descriptor_dim: int, leaky_slope: float,
                 stride: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.descriptor_dim = descriptor_dim
        self.stride = stride
        layers: list[nn.Module] = []
        in_ch = 3
        for d, s in layer_plan(patch_size, stride):
            layers += [nn.Conv2d(in_ch, channels, 3, dilation=d, stride=s), nn.LeakyReLU(leaky_slope)]
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
    """A descriptor for every pixel (every `net.stride`-th row and column) in one pass.
    images (B, 3, H, W) -> (B, D, ceil(H / s), ceil(W / s))."""
    return net(pad_for_dense(images, net.patch_size))


def patch_descriptors(net: PatchNet, images: torch.Tensor, positions: list[tuple[int, int]]) -> torch.Tensor:
    """The reference, one patch at a time: the net on the p x p patch centred at each (row, col) of the
    reflect-padded image. images (B, 3, H, W) -> (B, len(positions), D)."""
    p = net.patch_size
    padded = pad_for_dense(images, p)
    out = [net(padded[:, :, r:r + p, c:c + p]).flatten(1) for r, c in positions]
    return torch.stack(out, dim=1)


def build_nets(patch_sizes: tuple[int, ...], channels: int, descriptor_dim: int, leaky_slope: float,
               seed: int, stride: int = 1) -> nn.ModuleDict:
    """One PatchNet per patch size, keyed "p<size>", initialised from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleDict({f"p{p}": PatchNet(p, channels, descriptor_dim, leaky_slope, stride)
                              for p in patch_sizes})
