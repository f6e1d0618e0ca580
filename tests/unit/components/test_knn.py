"""Tests for components.knn: exact flat search against brute force, IVF variants, write/read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components import knn
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
        build_index(blobs(10), "lsh")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
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
    assert knn.index_kind(again) == kind and knn.get_breadth(again) == knn.get_breadth(index)


# ------------------------------------------------------------------------------- HNSW and index choice
def test_hnsw_is_deterministic_and_close_to_exact() -> None:
    bank, queries = blobs(3000), near(blobs(3000), 300, seed=2)
    a, b = build_index(bank, "hnsw", hnsw_m=8), build_index(bank, "hnsw", hnsw_m=8)
    knn.set_breadth(a, 64)
    knn.set_breadth(b, 64)
    da, ia = knn_distances(a, queries)
    db, ib = knn_distances(b, queries)
    np.testing.assert_array_equal(ia, ib)  # built on one thread: same graph, same answers
    ref, _ = brute_force(bank, queries, 1)
    assert np.mean(np.abs(da - ref) <= 1e-3 * ref) > 0.98


def test_auto_is_exact_for_small_banks_and_checks_hnsw_recall() -> None:
    bank = blobs(3000)
    probes = near(bank, 500, seed=5)
    index, report = knn.choose_index(bank, "auto", probes, target_recall=0.9, flat_max_bank=5000)
    assert knn.index_kind(index) == "flat" and report.kind == "flat" and report.recall == 1.0
    index, report = knn.choose_index(bank, "auto", probes, target_recall=0.99, flat_max_bank=1000, hnsw_m=4)
    assert knn.index_kind(index) == report.kind
    if report.kind == "hnsw":  # the breadth was raised until the probes reached the target
        assert report.recall >= 0.99 and knn.get_breadth(index) == report.breadth
        assert report.breadth in knn.EF_SEARCH and report.probes == 500
    else:
        assert report.fallback  # no breadth reached it: exact search, and the report says why
    # an independent check of the recorded recall
    ref, _ = brute_force(bank, probes, 1)
    got, _ = knn_distances(index, probes)
    assert np.mean(got[:, 0] <= ref[:, 0] * (1 + 1e-3) + 1e-4) >= report.recall - 0.02


def test_recall_check_raises_the_breadth_until_the_target() -> None:
    bank = blobs(4000, dim=48, n_centers=200)
    probes = near(bank, 400, scale=2.0, seed=6)
    index = build_index(bank, "hnsw", hnsw_m=4)
    breadth, figures = knn.recall_check(index, bank, probes, target=0.999)
    low = build_index(bank, "hnsw", hnsw_m=4)
    knn.set_breadth(low, knn.EF_SEARCH[0])
    _, low_figures = knn.recall_check(low, bank, probes, target=0.0)  # stops at the first breadth
    assert breadth >= knn.EF_SEARCH[0] and figures["recall"] >= low_figures["recall"]
    assert 0.0 <= figures["mean_rel_error"] <= low_figures["mean_rel_error"] + 1e-9


def test_auto_falls_back_to_exact_when_no_breadth_reaches_the_target(monkeypatch) -> None:
    monkeypatch.setattr(knn, "EF_SEARCH", (1,))
    bank = blobs(3000, dim=48, n_centers=300)
    probes = near(bank, 300, scale=3.0, seed=7)
    index, report = knn.choose_index(bank, "auto", probes, target_recall=1.0, flat_max_bank=10, hnsw_m=4)
    assert knn.index_kind(index) == "flat" and report.kind == "flat" and "recall" in report.fallback
    # asked for explicitly, HNSW is kept (and the report shows the recall it reached)
    index, report = knn.choose_index(bank, "hnsw", probes, target_recall=1.0, hnsw_m=4)
    assert knn.index_kind(index) == "hnsw" and report.recall < 1.0 and not report.fallback


def test_without_probes_the_report_says_unchecked() -> None:
    index, report = knn.choose_index(blobs(2000), "hnsw", None)
    assert knn.index_kind(index) == "hnsw" and np.isnan(report.recall) and report.probes == 0


def test_exact_maximum_makes_every_images_maximum_exact() -> None:
    """Distances from a stalled search (overestimates on some patches, as a bad HNSW graph gives): after
    exact_maximum each image's maximum and its patch's entry equal brute force's, and the other
    overestimates it did not need are left alone."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(4, 50, 8)).astype(np.float32)
    sq, nn = knn.build_index(bank, "flat").search(queries.reshape(-1, 8), 1)
    exact = np.sqrt(np.maximum(sq[:, 0], 0)).reshape(4, 50)
    dist, idx = exact.copy(), nn[:, 0].reshape(4, 50).copy()
    stalled = rng.random((4, 50)) < 0.3  # 30 % of patches overestimated, by up to 5x
    dist[stalled] *= 1 + 4 * rng.random(stalled.sum())
    idx[stalled] = (idx[stalled] + 1) % 300
    before = dist.copy()
    searched = knn.exact_maximum(bank, queries, dist, idx)
    rows = np.arange(4)
    np.testing.assert_allclose(dist.max(1), exact.max(1), rtol=1e-5)
    assert np.array_equal(idx[rows, dist.argmax(1)], nn[:, 0].reshape(4, 50)[rows, exact.argmax(1)])
    assert (dist >= exact - 1e-5).all() and searched < stalled.sum() + 4 * 8
    assert (dist != before).sum() <= searched
