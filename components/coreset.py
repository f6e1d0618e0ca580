"""Greedy coreset selection (minimax facility location / iterative k-center), as in PatchCore.

All functions are pure and seeded: the same features, ratio and seed give the same indices, whether the
features are in memory (`greedy_coreset`) or streamed chunk by chunk (`ProjectionStream` +
`greedy_coreset_projected`): the projection runs on the same fixed row blocks in both cases, so the
projected matrix, and with it every selected index, is bitwise the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PROJECTION_BLOCK = 16384  # rows per projection matmul, at fixed absolute offsets (see module docstring)
RADIUS_RTOL = 1e-4  # extend_coreset: a point within (1 + rtol) * the bank's radius counts as covered


@dataclass(frozen=True)
class Coreset:
    """indices (M,) int64 into the features; sq_radius: the largest squared (projected) distance from
    any feature to its nearest selected one (the k-center covering radius, squared)."""

    indices: torch.Tensor
    sq_radius: float


def projection_matrix(n_features: int, dim: int, seed: int) -> torch.Tensor | None:
    """The seeded Gaussian JL matrix (n_features, dim) / sqrt(dim); None when dim is 0 or >= n_features."""
    if dim <= 0 or dim >= n_features:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_features, dim, generator=generator) / dim**0.5


def _project_block(block: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    return block.float() if matrix is None else block.float() @ matrix


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection. features (N, D) -> (N, dim) float32 with a seeded Gaussian matrix,
    computed in blocks of PROJECTION_BLOCK rows. Returns `features` as float32 when dim is 0 or >= D."""
    matrix = projection_matrix(features.shape[1], dim, seed)
    if matrix is None:
        return features.float()
    out = torch.empty(features.shape[0], dim)
    for start in range(0, features.shape[0], PROJECTION_BLOCK):
        out[start:start + PROJECTION_BLOCK] = _project_block(features[start:start + PROJECTION_BLOCK], matrix)
    return out


class ProjectionStream:
    """`random_projection` of rows that arrive in chunks of any size: add(rows (n, D)) ... finish() ->
    the transposed projection (dim, N) float32, bitwise equal to random_projection(all rows).T.

    Holds only the projected rows (N * dim * 4 bytes) plus under one block of pending input rows."""

    def __init__(self, n_features: int, dim: int, seed: int, block: int = PROJECTION_BLOCK) -> None:
        self.matrix = projection_matrix(n_features, dim, seed)
        self.n_features, self.block = n_features, block
        self.dim = n_features if self.matrix is None else dim
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self._done: list[torch.Tensor] = []
        self.rows = 0

    def add(self, rows: torch.Tensor | np.ndarray) -> None:
        rows = torch.as_tensor(rows)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"rows must be (n, {self.n_features}), got {tuple(rows.shape)}")
        self._pending.append(rows.clone())
        self._pending_rows += rows.shape[0]
        self.rows += rows.shape[0]
        while self._pending_rows >= self.block:
            merged = torch.cat(self._pending)
            self._done.append(_project_block(merged[: self.block], self.matrix))
            rest = merged[self.block:]
            self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def finish(self) -> torch.Tensor:
        """-> (dim, N) float32; the stream is empty afterwards."""
        if self._pending:
            self._done.append(_project_block(torch.cat(self._pending), self.matrix))
            self._pending, self._pending_rows = [], 0
        xt = torch.empty(self.dim, self.rows)
        start = 0
        while self._done:
            part = self._done.pop(0)
            xt[:, start:start + part.shape[0]] = part.T
            start += part.shape[0]
        self.rows = 0
        return xt


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
    return select_coreset(features, ratio, seed, projection_dim, progress, chunk).indices


def select_coreset(features: torch.Tensor, ratio: float, seed: int = 0, projection_dim: int = 128,
                   progress: ProgressFn | None = None, chunk: int = 64) -> Coreset:
    """`greedy_coreset` with its covering radius. features (N, D) -> Coreset(indices (M,), sq_radius)."""
    n = features.shape[0]
    if coreset_size(n, ratio) >= n:
        return Coreset(torch.arange(n), 0.0)
    # (d, N) layout: one vector-matrix product per step streams the points once (4x faster than mv on (N, d))
    xt = random_projection(features, projection_dim, seed).T.contiguous()
    return greedy_coreset_projected(xt, ratio, seed, progress, chunk)


def greedy_coreset_projected(xt: torch.Tensor, ratio: float, seed: int = 0,
                             progress: ProgressFn | None = None, chunk: int = 64) -> Coreset:
    """The k-center loop on already projected points xt (d, N) float32 (e.g. `ProjectionStream.finish()`).
    -> Coreset(indices (M,), sq_radius) with M = round(N * ratio); same start point and picks as
    `greedy_coreset` on the unprojected features."""
    n = xt.shape[1]
    m = coreset_size(n, ratio)
    if m >= n:
        return Coreset(torch.arange(n), 0.0)
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
    return Coreset(selected, float(min_dist.max()))


def extend_coreset(xt: torch.Tensor, bank_sq_dist: torch.Tensor, max_new: int, sq_radius: float,
                   progress: ProgressFn | None = None, chunk: int = 64) -> Coreset:
    """Continue a greedy coreset over new points. xt (d, N) projected new points; bank_sq_dist (N,)
    squared projected distance of each to its nearest existing bank entry; sq_radius: the existing bank's
    squared covering radius. Picks the farthest new point while it lies beyond the radius (with a relative
    tolerance RADIUS_RTOL), at most `max_new` of them. -> Coreset(indices (K,) into the new points, the
    new points' squared covering radius by bank + picks). A new point already within the radius adds
    nothing: updating with the very images fitted adds (almost) no entry."""
    sq_norms = (xt * xt).sum(0)
    min_dist = bank_sq_dist.float().clone()
    limit = sq_radius * (1.0 + RADIUS_RTOL)
    selected: list[int] = []
    while len(selected) < max_new and min_dist.numel():
        idx = int(torch.argmax(min_dist))
        if float(min_dist[idx]) <= limit:
            break
        selected.append(idx)
        torch.minimum(min_dist, _sq_dist_to(xt, sq_norms, idx), out=min_dist)
        if progress is not None and len(selected) % chunk == 0:
            progress(len(selected), max_new)
    radius = float(min_dist.max()) if min_dist.numel() else 0.0
    return Coreset(torch.tensor(selected, dtype=torch.long), radius)


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
