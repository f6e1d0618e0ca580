"""Nearest-neighbour search over a memory bank with faiss (exact L2 by default; IVF and IVF-PQ options)."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)


def build_index(bank: np.ndarray, kind: str = "flat", nlist: int = 256, pq_m: int = 16, seed: int = 0):
    """A faiss index over bank (M, D) float32. kind: flat (exact L2), ivf (IVF-Flat) or ivfpq.

    IVF variants need at least `nlist` training points; nlist is reduced to fit smaller banks. IVF-PQ codes
    have 8 bits (256 centroids per sub-quantizer), fewer for a bank of under 256 entries, which faiss
    could not otherwise train.
    """
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    m, d = bank.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind in ("ivf", "ivfpq"):
        nlist = max(1, min(nlist, m // 39))
        quantizer = faiss.IndexFlatL2(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            if d % pq_m:
                raise ValueError(f"ivfpq: embedding dim {d} is not divisible by pq_subquantizers {pq_m}")
            if m < 2:
                raise ValueError(f"ivfpq: a bank of {m} entries is too small to train product quantizers")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, min(8, int(np.log2(m))))
        index.cp.seed = seed
        index.train(bank)
        index.nprobe = max(1, nlist // 8)
    else:
        raise ValueError(f"unknown index kind {kind!r} (flat, ivf, ivfpq)")
    index.add(bank)
    return index


def knn_distances(index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """L2 distances and indices of the k nearest bank entries. queries (Q, D) -> ((Q, k), (Q, k))."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sq, idx = index.search(queries, k)
    return np.sqrt(np.maximum(sq, 0.0)), idx


def nearest_sq_distances(bank: np.ndarray, queries: np.ndarray, block: int = 65536) -> np.ndarray:
    """Exact squared L2 distance from each query to its nearest bank entry. bank (M, D), queries (Q, D)
    -> (Q,) float32, searched in blocks of `block` queries (flat index, so memory stays Q + block * k)."""
    index = build_index(bank, "flat")
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), block):
        part = np.ascontiguousarray(queries[start:start + block], dtype=np.float32)
        out[start:start + len(part)] = np.maximum(index.search(part, 1)[0][:, 0], 0.0)
    return out


def index_nbytes(index) -> int:
    """Size of the index as faiss serialises it (what `write_index` stores)."""
    return int(faiss.serialize_index(index).nbytes)


def write_index(index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_index(path: Path):
    return faiss.read_index(str(path))


def set_threads(threads: int) -> None:
    if threads > 0:
        faiss.omp_set_num_threads(threads)
