"""flows.sharded: feature extraction over Dask workers gives bitwise the single-process bank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.config import Config
from components.data import scan_line
from components.patchcore import PatchCore
from components.training import image_stream
from flows.sharded import fit_sharded, plan_shards


@pytest.mark.parametrize(("n", "batch", "shards", "expected"), [
    (10, 4, 2, [(0, 4), (4, 10)]),
    (16, 4, 2, [(0, 8), (8, 16)]),
    (3, 4, 2, [(0, 3)]),
    (17, 4, 3, [(0, 4), (4, 12), (12, 17)]),
    (8, 1, 8, [(i, i + 1) for i in range(8)]),
])
def test_plan_shards_cuts_on_batch_boundaries(n: int, batch: int, shards: int, expected) -> None:
    plan = plan_shards(n, batch, shards)
    assert plan == expected
    assert all(a % batch == 0 for a, _ in plan)
    assert plan[0][0] == 0 and plan[-1][1] == n


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True])
def test_two_dask_workers_give_the_single_process_bank(tiny_config: Config, make_line, tmp_path: Path,
                                                       shared: bool) -> None:
    from dask.distributed import Client, LocalCluster

    line = make_line(tmp_path / "line", n_train=10, n_good_test=0, n_defect=0)
    paths = [s.path for s in scan_line(line, require_test=False).train]
    single = PatchCore(tiny_config).fit(image_stream([s for s in scan_line(line, require_test=False).train],
                                                     tiny_config.data))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      local_directory=str(tmp_path / "dask")) as cluster, Client(cluster) as client:
        shard_dir = tmp_path / "shards" if shared else None
        if shard_dir:
            shard_dir.mkdir()
        det = fit_sharded(tiny_config, paths, n_workers=2, shared_dir=shard_dir, work_dir=tmp_path / "work",
                          client=client)
    assert det.fit_stats_["extract_shards"] == 2.0
    np.testing.assert_array_equal(det.memory_bank_, single.memory_bank_)
    assert det.grid_ == single.grid_
    assert not any((tmp_path / "work").iterdir())


def _with_shards(cfg: Config, shards: int) -> Config:
    pc = cfg.detector.patchcore.model_copy(update={"coreset_shards": shards, "coreset_ratio": 0.05})
    return cfg.model_copy(update={"detector": cfg.detector.model_copy(update={"patchcore": pc})})


def test_sharded_coreset_cells_run_through_the_given_map(tiny_config: Config, textures, tmp_path: Path) -> None:
    """fit_store(map_fn=...) runs the coreset's cells through that map (what flows.sharded hands a Dask
    client's map): same bank as the builtin map."""
    from components.patchcore.features import FeatureStore, FeatureWriter

    cfg = _with_shards(tiny_config, 3)
    ref = PatchCore(cfg)
    rows = ref.extract(textures(range(6)))
    with FeatureWriter(tmp_path / "f", rows.shape[1], "float32", {"grid": "16,16"}) as writer:
        writer.append(rows)
    calls: list[int] = []

    def counting_map(fn, jobs):
        jobs = list(jobs)
        calls.append(len(jobs))
        return map(fn, jobs)

    det = PatchCore(cfg).fit_store(FeatureStore(tmp_path / "f"), map_fn=counting_map)
    plain = PatchCore(cfg).fit_store(FeatureStore(tmp_path / "f"))
    assert calls and calls[0] == 3
    assert det.fit_stats_["coreset_shards"] == 3.0
    np.testing.assert_array_equal(det.memory_bank_, plain.memory_bank_)


@pytest.mark.slow
def test_sharded_coreset_on_dask_workers(tiny_config: Config, make_line, tmp_path: Path) -> None:
    from dask.distributed import Client, LocalCluster

    cfg = _with_shards(tiny_config, 2)
    line = make_line(tmp_path / "line", n_train=8, n_good_test=0, n_defect=0)
    samples = list(scan_line(line, require_test=False).train)
    single = PatchCore(cfg).fit(image_stream(samples, cfg.data))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      local_directory=str(tmp_path / "dask")) as cluster, Client(cluster) as client:
        det = fit_sharded(cfg, [s.path for s in samples], n_workers=2, work_dir=tmp_path / "work", client=client)
    np.testing.assert_array_equal(det.memory_bank_, single.memory_bank_)
