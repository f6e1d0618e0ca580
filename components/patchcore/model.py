"""PatchCore's locally aware patch embedding as a torch module (no fitting, no state beyond the backbone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.backbones import FeatureExtractor


def pooling_matrix(channels: list[int], pretrain_dim: int | str, target_dim: int | str) -> torch.Tensor:
    """The paper's channel pooling as one linear map. (sum C_l, target) such that
    concat(levels) @ W == pool_target(concat(pool_pretrain(level) for each level)), exactly."""
    per_level, final = level_dims(channels, pretrain_dim, target_dim)
    blocks = []
    for c, d in zip(channels, per_level, strict=True):
        eye = torch.eye(c, dtype=torch.float64)
        blocks.append(eye if c == d else _pool_last(eye, d))
    w = torch.block_diag(*blocks)
    if w.shape[1] != final:
        w = _pool_last(w, final)
    return w


def isometric_factor(w: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """L (C, r) with L L^T = W W^T and r = rank(W): ||x W - y W|| == ||x L - y L|| for all x, y.

    w (C, D) -> (C, r). When r < D, searching with L gives the same distances at r / D of the cost.
    """
    gram = w @ w.T
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals.max() * rtol
    return (evecs[:, keep] * evals[keep].sqrt()).flip(1)


def level_dims(channels: list[int], pretrain_dim: int | str, target_dim: int | str) -> tuple[list[int], int]:
    """Per-level pooled dims and the final dim. "auto" keeps each level's own channels / their sum."""
    per_level = [c if pretrain_dim == "auto" else int(pretrain_dim) for c in channels]
    final = sum(per_level) if target_dim == "auto" else int(target_dim)
    return per_level, final


class PatchEmbedder(nn.Module):
    """Backbone levels -> locally aware patch embeddings on the shallowest level's grid.

    forward: images (B, 3, H, W) in [0, 1] -> embeddings (B, h, w, D), with (h, w) the grid of the first
    configured level. Steps (Roth et al. 2022, sec. 3.1): average pooling over a patch_size neighbourhood
    (stride patch_stride) per level; deeper levels upsampled bilinearly to the first level's grid; each level
    adaptively average-pooled over channels to its pretrain dim; the stacked levels pooled to the target dim.
    The two poolings are linear, so they run as one matrix product ("auto" dims skip it: anomalib's plain
    concatenation). With `compact`, when the target dim
    exceeds the rank of that map (e.g. 32 + 96 channels pooled to 1024), the map is replaced by an
    isometric factor of rank r: every pairwise distance, hence every nearest-neighbour score, is the same
    as in the paper's embedding, at r / target of the search cost.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        patch_size: int = 3,
        patch_stride: int = 1,
        pretrain_dim: int | str = 1024,
        target_dim: int | str = 1024,
        compact: bool = True,
        graph: bool = False,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.graph = graph  # without autograd: backbone + pooling as one frozen graph (FeatureExtractor.frozen_with)
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        w = pooling_matrix(extractor.channels, pretrain_dim, target_dim)
        self.paper_dim = w.shape[1]
        if compact:
            factor = isometric_factor(w)
            if factor.shape[1] < w.shape[1]:
                w = factor
        identity = w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype))
        self.pool = LevelPooling(patch_size, patch_stride, None if identity else w.float())
        self.embed_dim = w.shape[1]
        self.stride = extractor.strides[0] * patch_stride

    @property
    def projection(self) -> torch.Tensor | None:
        return self.pool.projection

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        with torch.no_grad():
            probe = self.extractor(torch.zeros(1, 3, *image_size))[0]
        h, w = probe.shape[-2:]
        pad = self.patch_size // 2
        return ((h + 2 * pad - self.patch_size) // self.patch_stride + 1,
                (w + 2 * pad - self.patch_size) // self.patch_stride + 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.graph:  # backbone and pooling as one frozen graph without autograd (plain calls otherwise)
            return self.extractor.frozen_with(self.pool, images)
        return self.pool(self.extractor(images))


class LevelPooling(nn.Module):
    """Backbone levels -> locally aware patch embeddings: levels [(B, C_l, h_l, w_l)] -> (B, h, w, D) on the
    first level's grid (average pooling over patch_size, stride patch_stride; deeper levels upsampled
    bilinearly; channels concatenated, then the pooling map `projection` (sum C_l, D) when given)."""

    def __init__(self, patch_size: int, patch_stride: int, projection: torch.Tensor | None) -> None:
        super().__init__()
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.register_buffer("projection", projection)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        pad = self.patch_size // 2
        pooled = [F.avg_pool2d(f, self.patch_size, self.patch_stride, pad, count_include_pad=True) for f in levels]
        grid = pooled[0].shape[-2:]
        parts = [f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                 for f in pooled]
        stacked = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # (B, h, w, sum C_l)
        if self.projection is not None:
            stacked = stacked @ self.projection
        return stacked.contiguous()


def _pool_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over the last axis. x (..., C) -> (..., dim)."""
    shape = x.shape[:-1]
    flat = x.reshape(-1, 1, x.shape[-1])
    return F.adaptive_avg_pool1d(flat, dim).reshape(*shape, dim)
