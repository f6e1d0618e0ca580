"""Divide-and-Assemble's networks: the U-Net generator with a multi-scale block-wise memory on every skip
connection and on the bottleneck, and a small patch discriminator.

GroupNorm rather than BatchNorm: the same output in training and evaluation (no running statistics), which
keeps scores independent of batch composition and training resumable bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.divide_assemble.config import DivideAssembleConfig
from components.divide_assemble.memory import MultiScaleBlockMemory


def conv_block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by GroupNorm and LeakyReLU(0.2). (B, c_in, H, W) -> (B, c_out, H, W)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2),
    )


class Generator(nn.Module):
    """U-Net over L = len(channels) levels; level l works at H / 2**l with channels[l] channels.

    Encoder level l's output reaches the decoder only through its memory module (levels 0..L-2 as skip
    connections, level L-1 as the bottleneck), so the reconstruction is assembled from memory reads alone.
    forward: images (B, 3, H, W) in [0, 1] -> reconstructions (B, 3, H, W) in [0, 1]; H, W multiples of
    2**(L-1) * max(block_sizes).
    """

    def __init__(self, p: DivideAssembleConfig) -> None:
        super().__init__()
        ch, g = list(p.channels), p.norm_groups
        self.encoders = nn.ModuleList(
            [conv_block(3, ch[0], g)] + [conv_block(ch[i - 1], ch[i], g) for i in range(1, len(ch))])
        self.memories = nn.ModuleList(
            MultiScaleBlockMemory(c, tuple(p.block_sizes), p.memory_size, p.temperature, p.shrink_threshold, p.fuse)
            for c in ch)
        # decoder level l (from L-2 down to 0): upsampled level l+1 concatenated with level l's memory read
        self.decoders = nn.ModuleList(conv_block(ch[i + 1] + ch[i], ch[i], g) for i in range(len(ch) - 1))
        self.head = nn.Conv2d(ch[0], 3, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2.0 - 1.0
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.avg_pool2d(x, 2))
            skips.append(self.memories[level](x))
        y = skips[-1]
        for level in range(len(skips) - 2, -1, -1):
            y = F.interpolate(y, size=skips[level].shape[-2:], mode="bilinear", align_corners=False)
            y = self.decoders[level](torch.cat([y, skips[level]], dim=1))
        return torch.sigmoid(self.head(y))


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convolutions with LeakyReLU(0.2), then a 3x3 convolution to one logit per patch.

    forward: images (B, 3, H, W) in [0, 1] -> logits (B, 1, H / 2**len(channels), W / 2**len(channels))."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2.0 - 1.0)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The latent features: each strided level's activation, len(channels) x (B, C_l, H / 2**(l+1), ...)."""
        x, out = images * 2.0 - 1.0, []
        for layer in self.net[:-1]:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return out


class DiscriminatorFeatures(nn.Module):
    """The discriminator's latent features as an alignment extractor (the paper's alignment): images (B, 3, H,
    W) -> PatchDiscriminator.features. Holds the discriminator (shared with training, not a copy)."""

    def __init__(self, disc: PatchDiscriminator) -> None:
        super().__init__()
        self.disc = disc

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.disc.features(images)
