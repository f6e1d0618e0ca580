"""Greedy coreset selection (minimax facility location / iterative k-center), as in PatchCore.

The greedy rule: start from a seeded random point, then repeatedly pick the point farthest from those
already picked. The textbook loop does one pass over all N points per pick: O(N k d) with k proportional
to N, memory-bound (a matrix-vector product per pick). Here it runs in rounds that pick exactly the same
points (`greedy_coreset_projected`):

1. take the B points with the largest distance to the current selection (the candidates); every other
   point is at most as far as the smallest of them (the floor);
2. run the greedy rule among the candidates alone, on their exact pairwise distances, for as long as the
   farthest remaining candidate lies beyond the floor: each such pick is the global greedy pick, because
   no other point can be farther;
3. update every point's distance to the selection with the round's picks in one matrix-matrix product
   (faiss's blocked BLAS search).

Same arithmetic, same picks as the one-at-a-time loop (up to float rounding on exact ties), but the
distance updates run at BLAS-3 speed instead of streaming the whole matrix once per pick.

Two ways to make the bank follow the data rather than a fixed ratio: stop at a covering `radius`
(`neighbour_distances` gives the scale of good-to-good distances to set it from), and, for very large
N, the composable coreset over spatial shards (`sharded_coreset`), whose shards are independent tasks.

All functions are pure and seeded: the same features, ratio and seed give the same indices, whether the
features are in memory (`greedy_coreset`) or streamed chunk by chunk (`ProjectionStream` +
`greedy_coreset_projected`): the projection runs on the same fixed row blocks in both cases, so the
projected matrix, and with it every selected index, is bitwise the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PROJECTION_BLOCK = 16384  # rows per projection matmul, at fixed absolute offsets (see module docstring)
RADIUS_RTOL = 1e-4  # extend_coreset: a point within (1 + rtol) * the bank's radius counts as covered
CANDIDATES = 2048  # candidates per greedy round (B above)


@dataclass(frozen=True)
class Coreset:
    """indices (M,) int64 into the features, in pick order; sq_radius: the largest squared (projected)
    distance from any feature to its nearest selected one (the k-center covering radius, squared);
    insertion (M,): each pick's squared distance to the picks before it (inf for the first), i.e. the
    covering radius just before that pick (non-increasing)."""

    indices: torch.Tensor
    sq_radius: float
    insertion: torch.Tensor | None = None


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
        return features.float().contiguous()
    out = torch.empty(features.shape[0], dim)
    for start in range(0, features.shape[0], PROJECTION_BLOCK):
        out[start:start + PROJECTION_BLOCK] = _project_block(features[start:start + PROJECTION_BLOCK], matrix)
    return out


class ProjectionStream:
    """`random_projection` of rows that arrive in chunks of any size: add(rows (n, D)) ... finish() ->
    the projection (N, dim) float32, bitwise equal to random_projection(all rows).

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
        """-> (N, dim) float32; the stream is empty afterwards."""
        if self._pending:
            self._done.append(_project_block(torch.cat(self._pending), self.matrix))
            self._pending, self._pending_rows = [], 0
        out = torch.empty(self.rows, self.dim)
        start = 0
        while self._done:
            part = self._done.pop(0)
            out[start:start + part.shape[0]] = part
            start += part.shape[0]
        self.rows = 0
        return out


def coreset_size(n: int, ratio: float) -> int:
    """Number of points kept for `ratio` of `n` (at least 1)."""
    return max(1, min(n, int(round(n * ratio))))


def greedy_coreset(features: torch.Tensor, ratio: float, seed: int = 0, projection_dim: int = 128,
                   progress: ProgressFn | None = None) -> torch.Tensor:
    """Iterative k-center selection. features (N, D) -> indices (M,) with M = round(N * ratio).

    Each step picks the point farthest from the selected set (squared L2 in the projected space), starting
    from a seeded random point (run in exact rounds, see the module docstring)."""
    return select_coreset(features, ratio, seed, projection_dim, progress).indices


def select_coreset(features: torch.Tensor, ratio: float, seed: int = 0, projection_dim: int = 128,
                   progress: ProgressFn | None = None, radius: float | None = None, shards: int = 1) -> Coreset:
    """`greedy_coreset` with its covering radius. features (N, D) -> Coreset. radius: stop once every
    point lies within it (projected space; at most round(N * ratio) picks either way); shards > 1: the
    composable coreset of `sharded_coreset`."""
    n = features.shape[0]
    if coreset_size(n, ratio) >= n:
        return Coreset(torch.arange(n), 0.0, torch.full((n,), float("inf")))
    xp = random_projection(features, projection_dim, seed)
    if shards > 1:
        return sharded_coreset(xp, ratio, shards, seed, progress)
    return greedy_coreset_projected(xp, ratio, seed, progress, radius=radius)


def greedy_coreset_projected(xp: torch.Tensor, ratio: float, seed: int = 0, progress: ProgressFn | None = None,
                             radius: float | None = None, candidates: int = CANDIDATES) -> Coreset:
    """The k-center rule on already projected points xp (N, d) float32 (e.g. `ProjectionStream.finish()`).
    -> Coreset with M = round(N * ratio) picks, fewer when `radius` is reached first or every point is
    covered; same start point and picks as `greedy_coreset` on the unprojected features."""
    n = xp.shape[0]
    m = coreset_size(n, ratio)
    if m >= n:
        return Coreset(torch.arange(n), 0.0, torch.full((n,), float("inf")))
    state = GreedyState(xp)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    state.add_first(start)
    stop = -1.0 if radius is None else float(radius) ** 2
    state.run(m, stop, progress, candidates)
    return state.result()


def extend_coreset(xp: torch.Tensor, bank_sq_dist: torch.Tensor, max_new: int, sq_radius: float,
                   progress: ProgressFn | None = None) -> Coreset:
    """Continue a greedy coreset over new points. xp (N, d) projected new points; bank_sq_dist (N,)
    squared projected distance of each to its nearest existing bank entry; sq_radius: the existing bank's
    squared covering radius. Picks the farthest new point while it lies beyond the radius (with a relative
    tolerance RADIUS_RTOL), at most `max_new` of them. -> Coreset(indices (K,) into the new points, the
    new points' squared covering radius by bank + picks). A new point already within the radius adds
    nothing: updating with the very images fitted adds (almost) no entry."""
    state = GreedyState(xp, bank_sq_dist)
    state.run(max_new, sq_radius * (1.0 + RADIUS_RTOL), progress)
    return state.result()


class GreedyState:
    """The greedy k-center rule over points xp (N, d) float32, run in exact rounds (module docstring).

    min_dist (N,): squared distance of each point to the selection (start: `initial`, or +inf until
    `add_first`). `run` picks until `max_picks` are selected or the farthest point is within `stop_sq`."""

    def __init__(self, xp: torch.Tensor, initial: torch.Tensor | None = None) -> None:
        self.xp = np.ascontiguousarray(xp.numpy() if isinstance(xp, torch.Tensor) else xp, dtype=np.float32)
        self.x = torch.from_numpy(self.xp)
        self.sq_norms = (self.x * self.x).sum(1)
        n = self.xp.shape[0]
        self.min_dist = (initial.float().clone() if initial is not None
                         else torch.full((n,), float("inf"))).contiguous()
        self.selected: list[int] = []
        self.insertion: list[float] = []

    def add_first(self, index: int) -> None:
        """Select `index` unconditionally (the seeded start)."""
        self.selected.append(index)
        self.insertion.append(float(self.min_dist[index]))
        dist = torch.mv(self.x, self.x[index]).mul_(-2).add_(self.sq_norms).add_(self.sq_norms[index])
        torch.minimum(self.min_dist, dist.clamp_(min=0), out=self.min_dist)

    def run(self, max_picks: int, stop_sq: float = -1.0, progress: ProgressFn | None = None,
            candidates: int = CANDIDATES) -> None:
        n = self.xp.shape[0]
        while len(self.selected) < max_picks:
            b = min(candidates, n)
            values, cand = torch.topk(self.min_dist, b)
            cand, order = cand.sort()  # index order: ties go to the lowest index, as torch.argmax does
            values = values[order]
            if float(values.max()) <= max(stop_sq, 0.0):
                break  # every point is within the stop radius (or covered exactly)
            floor = float(values.min()) if b < n else -1.0  # no other point is farther than this
            picks = self._round(values, cand, floor, max(stop_sq, 0.0), max_picks - len(self.selected))
            self._update(cand[picks])
            if progress is not None:
                progress(len(self.selected), max_picks)

    def _round(self, values: torch.Tensor, cand: torch.Tensor, floor: float, stop_sq: float, budget: int) -> list[int]:
        """Greedy picks among the candidates while the farthest lies beyond the floor -> positions in cand."""
        xc = self.x[cand]
        sqc = self.sq_norms[cand]
        pair = (sqc[:, None] + sqc[None, :]).sub_(2 * (xc @ xc.T)).clamp_(min=0)
        current = values.clone()
        picks: list[int] = []
        while len(picks) < budget:
            j = int(torch.argmax(current))
            value = float(current[j])
            if value < floor or value <= stop_sq:
                break
            picks.append(j)
            self.insertion.append(value)
            torch.minimum(current, pair[j], out=current)
        return picks

    def _update(self, picked: torch.Tensor) -> None:
        """min_dist <- min(min_dist, squared distance to the nearest of `picked`), one blocked BLAS search."""
        self.selected.extend(picked.tolist())
        rows = np.ascontiguousarray(self.xp[picked.numpy()])
        dist, _ = faiss.knn(self.xp, rows, 1)
        torch.minimum(self.min_dist, torch.from_numpy(dist[:, 0]).clamp_(min=0), out=self.min_dist)

    def result(self) -> Coreset:
        radius = float(self.min_dist.max()) if self.min_dist.numel() else 0.0
        return Coreset(torch.tensor(self.selected, dtype=torch.long), radius,
                       torch.tensor(self.insertion, dtype=torch.float32))


def sharded_coreset(xp: torch.Tensor, ratio: float, shards: int, seed: int = 0,
                    progress: ProgressFn | None = None, map_fn: Callable = map) -> Coreset:
    """Composable coreset over spatial shards. xp (N, d) -> Coreset of M = round(N * ratio) indices.

    k-means (seeded, on a sample) cuts the points into `shards` cells; the greedy rule runs in each cell
    independently (`shard_greedy`, through `map_fn`: the builtin map, or a Dask client's map); the picks
    of all cells are merged by their insertion distance, which is exactly what one greedy run would do if
    no cell's picks covered another cell's points. Cells differ in density by orders of magnitude, so no
    per-cell share is right: every cell first makes a quarter of its proportional share, then all continue
    down to a common floor that is lowered in stages towards the M-th insertion distance (`_next_floor`),
    which keeps the picks made below it (wasted work) to a few per cent. Cost: N x (N / shards) x ratio
    x d, linear in N at a fixed cell size. Covering radius: each point is covered within its own cell, so the
    result's radius is at most the largest cell radius; near cell borders a global greedy run needs fewer
    picks, so the radius is somewhat larger than the global run's at the same M (measured in
    bench/coreset.py)."""
    xs = np.ascontiguousarray(xp.numpy() if isinstance(xp, torch.Tensor) else xp, dtype=np.float32)
    n = xs.shape[0]
    m = coreset_size(n, ratio)
    cells = spatial_cells(xs, min(shards, m), seed)
    members = [np.flatnonzero(cells == c) for c in range(int(cells.max()) + 1)]
    members = [ids for ids in members if len(ids)]
    run_cells = _cell_runner(xs, members, seed, map_fn)
    # a first quarter of each cell's proportional share, then all cells down to a common floor, lowered in
    # stages towards the floor at which M picks lie above it (extrapolated from the merged picks so far):
    # approaching it from above keeps picks made below the final threshold (wasted work) few, whatever
    # the cells' densities
    runs = run_cells([(c, max(2, int(np.ceil(m * len(ids) / n / 4))), -1.0) for c, ids in enumerate(members)])
    while True:
        insertion = np.concatenate([r[1] for r in runs])
        top = max(r[2] for r in runs)  # no point any cell has not picked lies farther than this
        known = np.sort(insertion[insertion > top])[::-1]  # picks certainly in global greedy order
        if len(known) >= m or top <= 0.0:
            break
        floor = _next_floor(known, top, m)
        again = [c for c, r in enumerate(runs) if r[2] > floor and len(r[0]) < len(members[c])]
        for c, r in zip(again, run_cells([(c, len(members[c]), floor) for c in again]), strict=True):
            runs[c] = r
        if progress is not None:
            progress(min(m, int((np.concatenate([r[1] for r in runs]) > floor).sum())), m)
    insertion = np.concatenate([r[1] for r in runs])
    owner = np.concatenate([np.full(len(r[0]), c) for c, r in enumerate(runs)])
    picked = np.concatenate([members[c][r[0]] for c, r in enumerate(runs)])
    order = np.argsort(-insertion, kind="stable")[:m]
    # each cell is covered by its own chosen prefix, within its first unchosen pick's distance (or, when
    # every pick it made was chosen, within the distance of the pick it would make next)
    kept = np.bincount(owner[order], minlength=len(runs))
    radius = max(float(r[1][kept[c]]) if kept[c] < len(r[1]) else r[2] for c, r in enumerate(runs))
    return Coreset(torch.from_numpy(picked[order].astype(np.int64)), radius,
                   torch.from_numpy(insertion[order].astype(np.float32)))


def _next_floor(known: np.ndarray, top: float, m: int) -> float:
    """Squared distance at which the merged greedy picks should number m, from the picks known so far
    (`known`, descending, all above `top`): the count of picks above a floor grows like a power of it;
    its exponent from the last halving of the count. Aims 1 % past m, so that the last stages do not
    creep up on it; between a quarter of `top` and just under it."""
    g, m = len(known), m * 1.01
    half = float(known[g // 2]) if g >= 16 else np.inf
    if np.isfinite(half) and half > top * (1 + 1e-6):
        floor = top * (g / m) ** (np.log(half / top) / np.log(2.0))
    else:
        floor = top * 0.5
    return float(min(max(floor, top * 0.25), top * (1 - 1e-6)))


def _cell_runner(xs: np.ndarray, members: list[np.ndarray], seed: int, map_fn: Callable) -> Callable:
    """-> run(requests [(cell, max_picks, floor_sq)]) -> [(indices, insertion, next)] per request. In this
    process (map_fn is the builtin map) each cell's greedy state is kept, so a cell asked for more picks
    continues; through another map (Dask) a cell is re-run from its seeded start, which gives the same
    picks (the rule is deterministic), so only paths and small arrays need to travel back."""
    if map_fn is not map:
        return lambda requests: list(map_fn(_shard_job, [(xs[members[c]], k, floor, seed + c)
                                                         for c, k, floor in requests]))
    states: dict[int, GreedyState] = {}

    def run(requests: list[tuple[int, int, float]]) -> list[tuple[np.ndarray, np.ndarray, float]]:
        out = []
        for c, max_picks, floor in requests:
            if c not in states:
                states[c] = GreedyState(torch.from_numpy(np.ascontiguousarray(xs[members[c]])))
                start = torch.randint(len(members[c]), (1,), generator=torch.Generator().manual_seed(seed + c))
                states[c].add_first(int(start))
            states[c].run(max_picks, floor)
            result = states[c].result()
            out.append((result.indices.numpy(), result.insertion.numpy(), result.sq_radius))
        return out

    return run


def shard_greedy(xp: np.ndarray, max_picks: int, floor_sq: float, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The greedy rule in one cell: xp (n, d) -> (indices (k,), insertion (k,), squared distance of the
    next pick), stopping after max_picks picks or once the farthest point is within floor_sq."""
    state = GreedyState(torch.from_numpy(xp))
    state.add_first(int(torch.randint(len(xp), (1,), generator=torch.Generator().manual_seed(seed))))
    state.run(max_picks, floor_sq)
    result = state.result()
    return result.indices.numpy(), result.insertion.numpy(), result.sq_radius


def _shard_job(job: tuple) -> tuple[np.ndarray, np.ndarray, float]:
    return shard_greedy(*job)


def spatial_cells(xp: np.ndarray, cells: int, seed: int, sample: int = 256) -> np.ndarray:
    """k-means cell of each point. xp (N, d) -> (N,) int64 in [0, cells); trained on at most
    `sample` points per cell (seeded)."""
    cells = max(1, min(cells, xp.shape[0]))
    if cells == 1:
        return np.zeros(xp.shape[0], dtype=np.int64)
    kmeans = faiss.Kmeans(xp.shape[1], cells, niter=10, seed=seed, max_points_per_centroid=sample, verbose=False)
    kmeans.train(xp)
    _, assign = kmeans.index.search(xp, 1)
    return assign[:, 0].astype(np.int64)


def neighbour_distances(xp: torch.Tensor | np.ndarray, rows_per_image: int, images: int = 16, per_image: int = 128,
                        seed: int = 0) -> np.ndarray:
    """The scale of good-to-good variation: for patches of a few seeded images, the L2 distance to the
    nearest patch of any *other* image. xp (N, d) image-major (rows_per_image rows per image) -> (P,)
    with P = images * per_image (fewer for small lines). Needs at least two images; else empty."""
    xs = np.ascontiguousarray(xp.numpy() if isinstance(xp, torch.Tensor) else xp, dtype=np.float32)
    n_images = xs.shape[0] // max(rows_per_image, 1)
    if n_images < 2:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = []
    for image in rng.choice(n_images, min(images, n_images), replace=False):
        a, b = int(image) * rows_per_image, (int(image) + 1) * rows_per_image
        probe = np.ascontiguousarray(xs[a + rng.choice(rows_per_image, min(per_image, rows_per_image), replace=False)])
        best = np.full(len(probe), np.inf, dtype=np.float32)
        for part in (xs[:a], xs[b:]):
            if len(part):
                best = np.minimum(best, faiss.knn(probe, np.ascontiguousarray(part), 1)[0][:, 0])
        out.append(np.sqrt(np.maximum(best, 0.0)))
    return np.concatenate(out)


def coverage_radius(features: torch.Tensor, indices: torch.Tensor, block: int = 8192) -> float:
    """max over points of the L2 distance to the nearest selected point. features (N, D), indices (M,)."""
    centers = features[indices].float()
    worst = 0.0
    for start in range(0, features.shape[0], block):
        d = torch.cdist(features[start : start + block].float(), centers)
        worst = max(worst, float(d.min(1).values.max()))
    return worst
