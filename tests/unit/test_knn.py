"""Tests for components.knn: exact flat search against brute force, IVF variants, write/read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.knn import build_index, knn_distances, read_index, write_index


def blobs(n: int, dim: int = 32, n_centers: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, dim)) * 5
    return (centers[rng.integers(0, n_centers, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def near(bank: np.ndarray, n: int, scale: float = 0.5, seed: int = 1) -> np.ndarray:
    """Queries drawn around random bank entries (like test patches around the memory bank)."""
    rng = np.random.default_rng(seed)
    return (bank[rng.integers(0, len(bank), n)] + scale * rng.normal(size=(n, bank.shape[1]))).astype(np.float32)


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = torch.cdist(torch.from_numpy(queries).double(), torch.from_numpy(bank).double())
    values, indices = d.topk(k, dim=1, largest=False)
    return values.numpy(), indices.numpy()


def test_flat_is_exact() -> None:
    bank = blobs(2000)
    queries = blobs(300, seed=1)
    dist, idx = knn_distances(build_index(bank, "flat"), queries, k=5)
    ref_dist, ref_idx = brute_force(bank, queries, 5)
    assert dist.shape == idx.shape == (300, 5)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-3)
    assert (idx[:, 0] == ref_idx[:, 0]).mean() == 1.0
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_flat_finds_bank_members_at_distance_zero() -> None:
    bank = blobs(500)
    dist, idx = knn_distances(build_index(bank, "flat"), bank[:50], k=1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(50))
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-3)
    assert dist.dtype == np.float32 and np.all(dist >= 0)


def test_float64_and_non_contiguous_inputs() -> None:
    bank = blobs(300).astype(np.float64)
    queries = np.asfortranarray(blobs(20, seed=2).astype(np.float64))
    dist, _ = knn_distances(build_index(bank, "flat"), queries, k=1)
    np.testing.assert_allclose(dist[:, 0], brute_force(bank.astype(np.float32), queries.astype(np.float32), 1)[0][:, 0],
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("kind", "n_bank", "min_recall", "max_rel_err"), [
    ("ivf", 2000, 0.95, 1e-4),    # measured: recall 1.0, distances exact
    ("ivfpq", 2000, 0.8, 0.3),    # measured: recall 1.0, median distance error 13 %
    ("ivf", 120, 0.95, 1e-4),     # nlist shrinks to fit the bank
    ("ivfpq", 120, 0.8, 0.6),     # under 256 entries: fewer PQ bits (measured error 37 %)
])
def test_ivf_variants_return_plausible_neighbours(kind: str, n_bank: int, min_recall: float,
                                                   max_rel_err: float) -> None:
    bank = blobs(n_bank)
    queries = near(bank, 200)
    index = build_index(bank, kind, nlist=64, pq_m=8, seed=0)
    assert index.ntotal == n_bank
    dist, idx = knn_distances(index, queries, k=1)
    ref_dist, ref_idx = brute_force(bank, queries, 1)
    assert np.all(idx >= 0)
    recall = float((idx[:, 0] == ref_idx[:, 0]).mean())
    rel_err = float(np.median(np.abs(dist[:, 0] - ref_dist[:, 0]) / ref_dist[:, 0]))
    assert recall >= min_recall, (kind, recall)
    assert rel_err <= max_rel_err, (kind, rel_err)
    # the neighbour returned is a real bank entry close to the true nearest one
    true_nn = np.linalg.norm(bank[idx[:, 0]] - queries, axis=1)
    assert np.median(true_nn / ref_dist[:, 0]) < 1.2


def test_ivfpq_needs_divisible_dims_and_a_few_entries() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        build_index(blobs(400, dim=30), "ivfpq", pq_m=8)
    with pytest.raises(ValueError, match="too small"):
        build_index(blobs(1, dim=32), "ivfpq", pq_m=8)
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(blobs(10), "hnsw")


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_write_read_round_trip(tmp_path: Path, kind: str) -> None:
    bank = blobs(600)
    queries = near(bank, 50, seed=4)
    index = build_index(bank, kind, nlist=32, pq_m=8)
    path = tmp_path / f"{kind}.faiss"
    write_index(index, path)
    again = read_index(path)
    assert again.ntotal == index.ntotal
    d1, i1 = knn_distances(index, queries, k=3)
    d2, i2 = knn_distances(again, queries, k=3)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    if kind != "flat":
        assert again.nprobe == index.nprobe
