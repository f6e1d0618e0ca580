"""Patch features that outgrow memory: collect them in RAM or stream them to a `FeatureStore`, projecting
them for the coreset on the way; and the incremental (continued) coreset of an update.

    with Workspace(params.feature_dir) as workspace:
        got = collect_features(rows, dim, "float16", "auto", 2048 << 20, workspace.path, 128, seed)
        # got.features (N, D) in RAM, or got.store on disk with got.xp (N, d) projected for the coreset

A streamed fit holds the projection (N * projection_dim * 4 bytes) and the (N,) min-distances, never the
(N, D) features; it selects bitwise the same indices as the in-memory path (coreset.ProjectionStream).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components import coreset, knn
from components.patchcore.features import DEFAULT_CHUNK_ROWS, FeatureStore, FeatureWriter

logger = logging.getLogger(__name__)


class Workspace:
    """A temporary folder under `parent` (None: TMPDIR), created on the first `path()` call and removed
    on exit, so a fit that never spills touches no disk."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.parent = Path(parent) if parent is not None else None
        self.root: Path | None = None

    def path(self, name: str = "features.safetensors") -> Path:
        if self.root is None:
            if self.parent is not None:
                self.parent.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix="defectops-features-", dir=self.parent))
        return self.root / name

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Collected:
    """Features of a fit: in RAM (`features` (N, D)) or on disk (`store`, with `xp` (N, d) its
    coreset projection)."""

    features: torch.Tensor | None
    store: FeatureStore | None
    xp: torch.Tensor | None

    @property
    def n_rows(self) -> int:
        return len(self.store) if self.store is not None else int(self.features.shape[0])

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows at indices (M,) -> (M, D) float32."""
        if self.store is not None:
            return torch.from_numpy(self.store.gather(indices)).float()
        return self.features[indices].float()

    def projected(self, projection_dim: int, seed: int) -> torch.Tensor:
        """(N, d) float32: the coreset's projection (computed now for in-RAM features)."""
        if self.xp is not None:
            return self.xp
        return coreset.random_projection(self.features, projection_dim, seed)


def collect_features(rows: Iterable[torch.Tensor], dim: int, dtype: str, mode: bool | str, threshold_bytes: int,
                     store_path, projection_dim: int, seed: int, metadata: dict[str, str] | None = None) -> Collected:
    """rows: (n, D) chunks in order. mode False: all in RAM; True: all to a store at `store_path()`;
    "auto": in RAM until they pass `threshold_bytes`, then everything so far and the rest to the store.
    -> Collected. ValueError when there are no rows."""
    chunks: list[torch.Tensor] = []
    held = 0
    writer: FeatureWriter | None = None
    stream: coreset.ProjectionStream | None = None
    try:
        for chunk in rows:
            if writer is None:
                chunks.append(chunk)
                held += chunk.numel() * chunk.element_size()
                if mode is True or (mode == "auto" and held > threshold_bytes):
                    logger.info("streaming patch features to disk after %.0f MB in RAM", held / 2**20)
                    writer = FeatureWriter(store_path(), dim, dtype, metadata)
                    stream = coreset.ProjectionStream(dim, projection_dim, seed)
                    for held_chunk in chunks:
                        writer.append(held_chunk)
                        stream.add(held_chunk)
                    chunks = []
            else:
                writer.append(chunk)
                stream.add(chunk)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        if not chunks:
            raise ValueError("fit needs at least one training image")
        return Collected(torch.cat(chunks), None, None)
    if writer.rows == 0:
        writer.abort()
        raise ValueError("fit needs at least one training image")
    return Collected(None, writer.close(), stream.finish())


def project_store(store: FeatureStore, projection_dim: int, seed: int) -> torch.Tensor:
    """The coreset projection of a store read chunk by chunk. -> (N, d) float32."""
    stream = coreset.ProjectionStream(store.shape[1], projection_dim, seed)
    for _, chunk in store.iter_chunks(DEFAULT_CHUNK_ROWS):
        stream.add(torch.from_numpy(chunk))
    return stream.finish()


def extend_bank(bank: np.ndarray, new: Collected, ratio: float, seed: int, projection_dim: int,
                sq_radius: float, progress=None) -> tuple[torch.Tensor, coreset.Coreset]:
    """Rows of `new` to append to `bank` (M, D): the greedy coreset continued from the bank (min-distances
    start at each new point's distance to its nearest bank entry, in the same projection), adding points
    only while they lie beyond the bank's covering radius, at most round(ratio * N_new).
    -> (rows (K, D) float32, the Coreset of indices into `new`)."""
    xp = new.projected(projection_dim, seed)
    bank_proj = coreset.random_projection(torch.from_numpy(np.ascontiguousarray(bank)), projection_dim, seed)
    to_bank = knn.nearest_sq_distances(bank_proj.numpy(), xp.numpy())
    picked = coreset.extend_coreset(xp, torch.from_numpy(to_bank), coreset.coreset_size(xp.shape[0], ratio),
                                    sq_radius, progress)
    rows = new.gather(picked.indices) if len(picked.indices) else torch.zeros(0, bank.shape[1])
    return rows, picked
