"""Block-wise memory: divide a feature map into b x b blocks, replace each block by an attention-weighted
sum of learned memory items, assemble the blocks back (Hou et al., ICCV 2021, after MemAE's addressing).

Addressing (MemAE, Gong et al. 2019): w = softmax(cos(q, m_i) / temperature) over the M items, optionally
sparsified by hard shrinkage (w_i kept only above `shrink`, then renormalised to sum 1). The read is w @ M,
so every output block lies in the convex hull of the memory items: with few items, the module cannot pass
an arbitrary input through unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def block_divide(features: torch.Tensor, block: int) -> torch.Tensor:
    """Non-overlapping b x b blocks as flat queries. features (B, C, H, W) -> (B, (H/b)(W/b), C*b*b).

    Each query is ordered (channel, row-in-block, col-in-block), as torch's unfold does."""
    _, _, h, w = features.shape
    if h % block or w % block:
        raise ValueError(f"feature map {h}x{w} is not divisible into {block}x{block} blocks")
    return F.unfold(features, kernel_size=block, stride=block).transpose(1, 2)


def block_assemble(blocks: torch.Tensor, size: tuple[int, int], block: int) -> torch.Tensor:
    """Inverse of `block_divide`. blocks (B, (H/b)(W/b), C*b*b) -> (B, C, H, W)."""
    return F.fold(blocks.transpose(1, 2), output_size=size, kernel_size=block, stride=block)


def hard_shrink(weights: torch.Tensor, threshold: float, eps: float = 1e-12) -> torch.Tensor:
    """MemAE's sparse addressing: max(w - t, 0) * w / (|w - t| + eps), renormalised to sum 1 along the last
    dim. weights (..., M) -> (..., M); threshold 0 returns weights unchanged."""
    if threshold <= 0:
        return weights
    shrunk = F.relu(weights - threshold) * weights / ((weights - threshold).abs() + eps)
    return shrunk / shrunk.sum(dim=-1, keepdim=True).clamp_min(eps)


def address(queries: torch.Tensor, memory: torch.Tensor, temperature: float, shrink: float = 0.0) -> torch.Tensor:
    """Attention weights over the memory items. queries (..., D), memory (M, D) -> (..., M), rows sum to 1."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(memory, dim=-1).t()
    return hard_shrink(torch.softmax(similarity / temperature, dim=-1), shrink)


def memory_read(weights: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The weighted sum of memory items. weights (..., M), memory (M, D) -> (..., D)."""
    return weights @ memory


class BlockMemory(nn.Module):
    """One granularity: `size` learned items of dimension channels * block * block.

    forward: (B, C, H, W) -> (B, C, H, W), every b x b block replaced by its memory read."""

    def __init__(self, channels: int, block: int, size: int, temperature: float, shrink: float = 0.0) -> None:
        super().__init__()
        self.block, self.temperature, self.shrink = block, temperature, shrink
        dim = channels * block * block
        self.memory = nn.Parameter(torch.randn(size, dim) / math.sqrt(dim))

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """Addressing weights of every block. (B, C, H, W) -> (B, (H/b)(W/b), M)."""
        return address(block_divide(features, self.block), self.memory, self.temperature, self.shrink)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        read = memory_read(self.weights(features), self.memory)
        return block_assemble(read, tuple(features.shape[-2:]), self.block)


class MultiScaleBlockMemory(nn.Module):
    """Several granularities over the same feature map, combined by a 1x1 convolution over their concatenation
    (`fuse="conv"`) or by their mean (`fuse="mean"`). forward: (B, C, H, W) -> (B, C, H, W).

    Either way the output depends on the input only through the memory reads (the 1x1 conv is a fixed linear
    map of them): nothing of the input bypasses the memory."""

    def __init__(self, channels: int, block_sizes: tuple[int, ...], size: int, temperature: float,
                 shrink: float = 0.0, fuse: str = "conv") -> None:
        super().__init__()
        self.branches = nn.ModuleList(BlockMemory(channels, b, size, temperature, shrink) for b in block_sizes)
        self.fuse = nn.Conv2d(channels * len(block_sizes), channels, 1) if fuse == "conv" else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        reads = [branch(features) for branch in self.branches]
        if self.fuse is None:
            return torch.stack(reads).mean(dim=0)
        return self.fuse(torch.cat(reads, dim=1))
