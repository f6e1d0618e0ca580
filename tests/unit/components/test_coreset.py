"""Tests for components.coreset: greedy k-center selection and its random projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components import coreset
from components.coreset import coreset_size, coverage_radius, greedy_coreset, random_projection


def clustered(n_clusters: int = 8, per_cluster: int = 200, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Unequal Gaussian clusters: a few big, a few tiny (a random subset tends to miss the tiny ones)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 10
    sizes = [per_cluster if i % 2 == 0 else max(2, per_cluster // 50) for i in range(n_clusters)]
    return torch.cat([c + 0.5 * torch.randn(s, dim, generator=g) for c, s in zip(centers, sizes, strict=True)])


def test_deterministic_for_a_seed() -> None:
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
    a = greedy_coreset(x, 0.1, seed=3)
    b = greedy_coreset(x.clone(), 0.1, seed=3)
    c = greedy_coreset(x, 0.1, seed=4)
    assert torch.equal(a, b)
    assert a.shape == (50,) and a.dtype == torch.long
    assert len(set(a.tolist())) == 50
    assert not torch.equal(a, c)  # the seed picks the start point (and the projection)


def test_picks_the_farthest_points_on_a_hand_built_case() -> None:
    """Four corners of a square far away plus a tight cluster at the origin: after the start point, every
    step must take the point farthest from those already chosen."""
    corners = torch.tensor([[100.0, 100.0], [-100.0, 100.0], [100.0, -100.0], [-100.0, -100.0]])
    cluster = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [0.05, 0.05], [0.02, 0.07]])
    x = torch.cat([cluster, corners])  # corners at 6..9
    for seed in range(5):
        idx = greedy_coreset(x, 5 / 10, seed=seed, projection_dim=0).tolist()
        assert len(idx) == 5
        chosen = set(idx)
        assert {6, 7, 8, 9} <= chosen, (seed, idx)
        # the first pick after the start is the point farthest from the start
        start = idx[0]
        assert idx[1] == int(torch.cdist(x[start:start + 1], x).argmax())


def test_follows_the_k_center_rule_exactly() -> None:
    """Reference: the textbook O(N M) loop on exact distances (no projection)."""
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5)).double()
    idx = greedy_coreset(x, 0.1, seed=0, projection_dim=0)
    ref = [int(idx[0])]
    dist = torch.cdist(x.float(), x[ref].float()).min(1).values
    for _ in range(len(idx) - 1):
        ref.append(int(dist.argmax()))
        dist = torch.minimum(dist, torch.cdist(x.float(), x[ref[-1:]].float())[:, 0])
    assert idx.tolist() == ref


def test_greedy_covers_better_than_random_on_clustered_data() -> None:
    x = clustered()
    idx = greedy_coreset(x, 0.02, seed=0, projection_dim=16)
    greedy_radius = coverage_radius(x, idx)
    for seed in range(5):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: len(idx)]
        assert greedy_radius <= coverage_radius(x, perm)
    # the greedy set visits every cluster, tiny ones included: its radius is within-cluster scale
    assert greedy_radius < 10.0


def test_projection_preserves_distances_roughly() -> None:
    x = torch.randn(200, 1024, generator=torch.Generator().manual_seed(0))
    y = random_projection(x, 128, seed=0)
    assert y.shape == (200, 128)
    dx = torch.pdist(x)
    dy = torch.pdist(y)
    ratio = dy / dx
    # Johnson-Lindenstrauss at d=128: typical distortion ~ 1/sqrt(2 * 128) ~ 6 %
    assert abs(float(ratio.mean()) - 1.0) < 0.05
    assert float(ratio.std()) < 0.1
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.4
    assert torch.equal(y, random_projection(x, 128, seed=0))


def test_projection_identity_cases() -> None:
    x = torch.randn(10, 16, dtype=torch.float16)
    for dim in (0, 16, 64):
        out = random_projection(x, dim, seed=0)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, x.float())


@pytest.mark.parametrize(("n", "ratio", "expected"), [
    (100, 0.1, 10), (100, 1.0, 100), (100, 0.001, 1), (7, 0.5, 4), (1, 0.1, 1), (3, 0.999, 3),
])
def test_coreset_size(n: int, ratio: float, expected: int) -> None:
    assert coreset_size(n, ratio) == expected


def test_ratio_edge_cases() -> None:
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_coreset(x, 1.0), torch.arange(20))
    tiny = greedy_coreset(x, 1e-6)
    assert tiny.shape == (1,)
    assert greedy_coreset(x[:1], 0.5).tolist() == [0]
    assert greedy_coreset(x.half(), 0.5, projection_dim=2).shape == (10,)  # float16 features work


def test_progress_reports_the_end() -> None:
    calls = []
    greedy_coreset(torch.randn(1000, 8), 0.2, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (200, 200)
    assert all(total == 200 for _, total in calls)


def test_coverage_radius_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert coverage_radius(x, torch.tensor([0])) == pytest.approx(10.0)
    assert coverage_radius(x, torch.tensor([1])) == pytest.approx(5.0)
    assert coverage_radius(x, torch.tensor([0, 1, 2]), block=1) == pytest.approx(0.0)


# ------------------------------------------------------------------------ exact rounds, radius, shards
def textbook(x: torch.Tensor, m: int, start: int) -> tuple[list[int], list[float]]:
    """The one-pick-per-pass k-center loop in float64 -> (picks, squared distance of each at pick time)."""
    x = x.double()
    picks, ins = [start], [float("inf")]
    dist = ((x - x[start]) ** 2).sum(1)
    for _ in range(m - 1):
        i = int(dist.argmax())
        picks.append(i)
        ins.append(float(dist[i]))
        dist = torch.minimum(dist, ((x - x[i]) ** 2).sum(1))
    return picks, ins


@pytest.mark.parametrize("candidates", [1, 7, 64, 5000])
def test_rounds_pick_exactly_what_the_textbook_loop_picks(candidates: int) -> None:
    """Many rounds (few candidates) or one (all candidates): the same picks as one pick per pass."""
    x = clustered(per_cluster=150, dim=12, seed=3)
    state = coreset.GreedyState(x.float())
    state.add_first(5)
    state.run(60, candidates=candidates)
    got = state.result()
    ref, ins = textbook(x, 60, 5)
    assert got.indices.tolist() == ref
    np.testing.assert_allclose(got.insertion[1:].numpy(), np.array(ins[1:]), rtol=1e-4)
    assert torch.all(got.insertion[1:-1] >= got.insertion[2:])  # the covering radius never grows
    assert got.sq_radius == pytest.approx(float(coverage_radius(x, got.indices)) ** 2, rel=1e-4)


def test_radius_stop_keeps_every_point_within_the_radius() -> None:
    x = clustered(per_cluster=150, dim=12, seed=4)
    full = coreset.greedy_coreset_projected(x.float(), 0.5, seed=0)
    target = float(full.insertion[40]) ** 0.5 * (1 + 1e-6)  # the radius just before the 41st pick
    got = coreset.greedy_coreset_projected(x.float(), 0.5, seed=0, radius=target)
    assert len(got.indices) == 40 and got.indices.tolist() == full.indices[:40].tolist()
    assert coverage_radius(x, got.indices) <= target + 1e-4
    # the ratio still caps the bank
    assert len(coreset.greedy_coreset_projected(x.float(), 0.01, seed=0, radius=1e-6).indices) == round(len(x) * 0.01)


def test_duplicates_stop_the_selection_once_everything_is_covered() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(50, 1)
    got = coreset.greedy_coreset_projected(x, 0.2, seed=0)
    assert sorted(x[got.indices].tolist()) == [[0.0, 0.0], [1.0, 1.0]] and got.sq_radius == 0.0


def test_sharded_coreset_covers_every_point_within_its_radius() -> None:
    x = clustered(n_clusters=12, per_cluster=300, dim=10, seed=6).float()
    m = coreset_size(len(x), 0.05)
    got = coreset.sharded_coreset(x, 0.05, shards=4, seed=0)
    assert len(got.indices) == m == len(set(got.indices.tolist()))
    exact_radius = coverage_radius(x, got.indices)
    assert exact_radius <= got.sq_radius**0.5 + 1e-4  # the reported radius bounds the true one
    one = coreset.greedy_coreset_projected(x, 0.05, seed=0)
    assert exact_radius <= 2.0 * one.sq_radius**0.5  # constant factor of the global greedy run
    again = coreset.sharded_coreset(x, 0.05, shards=4, seed=0)
    assert torch.equal(got.indices, again.indices)  # seeded


def test_neighbour_distances_exclude_the_probed_image() -> None:
    """Two images, identical but for a shift: each patch's nearest patch of the other image is the shift."""
    a = torch.randn(64, 6, generator=torch.Generator().manual_seed(0)) * 10
    x = torch.cat([a, a + 0.5])
    d = coreset.neighbour_distances(x, rows_per_image=64, images=2, per_image=32, seed=0)
    assert d.shape == (64,)
    np.testing.assert_allclose(d, 0.5 * 6**0.5, rtol=1e-3)
    assert coreset.neighbour_distances(a, rows_per_image=64).size == 0  # one image: no scale


def test_sharded_coreset_reaches_the_merge_of_full_cell_runs_without_much_waste(monkeypatch) -> None:
    """Cells of very different density: the staged floors must give the same picks as running every cell
    to the end and merging by insertion distance, while picking few points below the final threshold."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(3000, 6, generator=gen) * 0.2, torch.randn(600, 6, generator=gen) * 3 + 20,
                   torch.randn(1200, 6, generator=gen) + torch.tensor([0.0, 40, 0, 0, 0, 0])])
    picked = []
    real_run = coreset.GreedyState.run

    def counting_run(self, max_picks, stop_sq=-1.0, *args, **kwargs):
        before = len(self.selected)
        real_run(self, max_picks, stop_sq, *args, **kwargs)
        picked.append(len(self.selected) - before)

    monkeypatch.setattr(coreset.GreedyState, "run", counting_run)
    got = coreset.sharded_coreset(x, 0.05, shards=3, seed=0)
    m = coreset_size(len(x), 0.05)
    assert len(got.indices) == m
    assert sum(picked) <= 1.25 * m  # first points count as picks too (one per cell)
    monkeypatch.setattr(coreset.GreedyState, "run", real_run)
    # reference: each cell run to the end, merged by insertion distance
    cells = coreset.spatial_cells(x.numpy(), 3, 0)
    merged = []
    for c in range(3):
        ids = np.flatnonzero(cells == c)
        idx, ins, _ = coreset.shard_greedy(np.ascontiguousarray(x.numpy()[ids]), len(ids), -1.0, 0 + c)
        merged += list(zip(ins.tolist(), ids[idx].tolist(), strict=True))
    merged.sort(key=lambda t: -t[0])
    assert sorted(got.indices.tolist()) == sorted(i for _, i in merged[:m])
