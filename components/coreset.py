"""Greedy coreset selection (minimax facility location / iterative k-center), as in PatchCore.

All functions are pure and seeded: the same features, ratio and seed give the same indices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection. features (N, D) -> (N, dim) with a seeded Gaussian matrix.

    Returns `features` unchanged when dim is 0 or not smaller than D.
    """
    n_features = features.shape[1]
    if dim <= 0 or dim >= n_features:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(n_features, dim, generator=generator) / dim**0.5
    return features.float() @ matrix


def coreset_size(n: int, ratio: float) -> int:
    """Number of points kept for `ratio` of `n` (at least 1)."""
    return max(1, min(n, int(round(n * ratio))))


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    seed: int = 0,
    projection_dim: int = 128,
    progress: ProgressFn | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """Iterative k-center selection. features (N, D) -> indices (M,) with M = round(N * ratio).

    Each step picks the point farthest from the selected set (squared L2 in the projected space), starting
    from a seeded random point. Distances are kept as one (N,) vector of squared distances and updated with
    one mat-vec per step, using ||x||^2 - 2 x.c + ||c||^2.
    """
    n = features.shape[0]
    m = coreset_size(n, ratio)
    if m >= n:
        return torch.arange(n)
    # (d, N) layout: one vector-matrix product per step streams the points once (4x faster than mv on (N, d))
    xt = random_projection(features, projection_dim, seed).T.contiguous()
    sq_norms = (xt * xt).sum(0)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    selected = torch.empty(m, dtype=torch.long)
    selected[0] = start
    min_dist = _sq_dist_to(xt, sq_norms, start)
    for i in range(1, m):
        idx = int(torch.argmax(min_dist))
        selected[i] = idx
        torch.minimum(min_dist, _sq_dist_to(xt, sq_norms, idx), out=min_dist)
        if progress is not None and (i % chunk == 0 or i == m - 1):
            progress(i + 1, m)
    return selected


def _sq_dist_to(xt: torch.Tensor, sq_norms: torch.Tensor, idx: int) -> torch.Tensor:
    """Squared L2 distance from every column of xt (d, N) to column idx -> (N,), clamped at 0."""
    center = xt[:, idx].unsqueeze(0)
    dist = torch.mm(center, xt).squeeze(0).mul_(-2).add_(sq_norms).add_(sq_norms[idx])
    return dist.clamp_(min=0)


def coverage_radius(features: torch.Tensor, indices: torch.Tensor, block: int = 8192) -> float:
    """max over points of the L2 distance to the nearest selected point. features (N, D), indices (M,)."""
    centers = features[indices].float()
    worst = 0.0
    for start in range(0, features.shape[0], block):
        d = torch.cdist(features[start : start + block].float(), centers)
        worst = max(worst, float(d.min(1).values.max()))
    return worst
