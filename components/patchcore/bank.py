"""Which patches become PatchCore's memory bank: the coreset rule of `detector.patchcore` (ratio, covering
radius, shards) applied to projected patch features, and the probe patches of the index's recall check.

    chosen = select_bank_rows(xp, params, rows_per_image, progress)   # xp (N, d) projected, image-major
    chosen.coreset.indices  # (M,) rows of the features to keep, in pick order
    chosen.stats            # coreset_sq_radius, and with a radius rule its target and the neighbour scale
    probes = probe_rows(n, chosen.coreset.indices, seed)             # (P,) rows not in the bank
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from components import coreset
from components.patchcore.config import PatchCoreConfig

logger = logging.getLogger(__name__)

SHARD_ROWS = 250_000  # coreset_shards "auto": one spatial shard per this many patches (bench/coreset.py)
RECALL_PROBES = 8192  # good patches outside the bank offered to the index's recall check (it keeps the
# quarter farthest from the bank, knn.hardest)


@dataclass(frozen=True)
class BankRows:
    coreset: coreset.Coreset
    stats: dict[str, float]


def radius_target(xp: torch.Tensor, params: PatchCoreConfig, rows_per_image: int) -> tuple[float | None, dict]:
    """The covering radius to stop at (projected space), and what it was derived from."""
    if params.coreset_radius is None:
        return None, {}
    if params.coreset_radius != "auto":
        return float(params.coreset_radius), {"coreset_radius_target": float(params.coreset_radius)}
    scale = coreset.neighbour_distances(xp, rows_per_image, seed=params.seed)
    if scale.size == 0:
        logger.warning("coreset_radius auto needs at least two training images: stopping at coreset_ratio only")
        return None, {}
    target = float(np.quantile(scale, params.coreset_radius_quantile))
    stats = {"coreset_radius_target": target, "neighbour_distance_q50": float(np.quantile(scale, 0.5)),
             "neighbour_distance_q90": float(np.quantile(scale, 0.9)), "neighbour_probes": float(scale.size)}
    logger.info("coreset radius target %.4f: quantile %.2f of %d good-to-good neighbour distances",
                target, params.coreset_radius_quantile, scale.size)
    return target, stats


def n_shards(params: PatchCoreConfig, n_rows: int) -> int:
    if params.coreset_shards == "auto":
        return max(1, math.ceil(n_rows / SHARD_ROWS))
    return int(params.coreset_shards)


def select_bank_rows(xp: torch.Tensor, params: PatchCoreConfig, rows_per_image: int,
                     progress: coreset.ProgressFn | None = None, map_fn: Callable = map) -> BankRows:
    """The coreset of projected features xp (N, d) under the configured rule -> BankRows. map_fn runs the
    shards of a sharded coreset (the builtin map, or one over a Dask client: flows.sharded)."""
    n = xp.shape[0]
    if coreset.coreset_size(n, params.coreset_ratio) >= n:
        return BankRows(coreset.Coreset(torch.arange(n), 0.0), {"coreset_sq_radius": 0.0})
    target, stats = radius_target(xp, params, rows_per_image)
    shards = n_shards(params, n) if target is None else 1
    if shards > 1:
        picked = coreset.sharded_coreset(xp, params.coreset_ratio, shards, params.seed, progress, map_fn)
        stats["coreset_shards"] = float(shards)
    else:
        picked = coreset.greedy_coreset_projected(xp, params.coreset_ratio, params.seed, progress, radius=target)
    stats["coreset_sq_radius"] = picked.sq_radius
    return BankRows(picked, stats)


def probe_rows(n_rows: int, bank_rows: torch.Tensor | np.ndarray, seed: int, count: int = RECALL_PROBES) -> np.ndarray:
    """Up to `count` seeded random rows in [0, n_rows) that are not in the bank, sorted -> (P,) int64."""
    outside = np.ones(n_rows, dtype=bool)
    outside[np.asarray(bank_rows, dtype=np.int64)] = False
    rows = np.flatnonzero(outside)
    if len(rows) > count:
        rows = np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))
    return rows.astype(np.int64)
