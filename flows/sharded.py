"""PatchCore feature extraction sharded over Dask workers, merged into one bank identical to the
single-process bank for the same seed.

The training images are cut into contiguous shards on `data.batch_size` boundaries, so every worker
embeds exactly the batches the single process would (a convolution's output can depend on the batch it
runs in); each worker streams its fp16/fp32 patch features to a FeatureStore shard; the client merges the
shards in the original order and fits from the merged store (`PatchCore.fit_store`): same features,
same projection, same coreset, bitwise the same bank.

    from flows.sharded import fit_sharded
    det = fit_sharded(cfg, image_paths, n_workers=2)                        # a LocalCluster on this machine
    det = fit_sharded(cfg, image_paths, address="tcp://scheduler:8786",     # a remote Dask cluster
                      shared_dir="/mnt/shared/defectops-shards")

With `detector.patchcore.coreset_shards` > 1 the coreset's spatial cells run on the same workers (`dask_map`).

Remote clusters: every worker needs this package and the same backbone weights (the same container
image); the weights sha256 each worker used is checked against the client's. With `shared_dir` (a
folder every worker and the client mount, e.g. NFS) workers write their shards there and only paths
travel; without it, each shard's rows come back through the scheduler (fine for thousands of images,
not for millions of patches). The Prefect form of the same fan-out is `run_extract_flow`: a
`DaskTaskRunner` pointed at `address`, or a LocalCluster when none is given.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.config import Config, validate
from components.data import Sample
from components.patchcore import PatchCore
from components.patchcore.features import FeatureStore, FeatureWriter, merge_stores
from components.training import image_stream

logger = logging.getLogger(__name__)


def plan_shards(n_images: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of images, cut only on batch_size boundaries, as even as the
    batches allow; never an empty shard (fewer shards than asked when there are few batches)."""
    n_batches = -(-n_images // batch_size)
    n_shards = max(1, min(n_shards, n_batches))
    bounds = [i * n_batches // n_shards * batch_size for i in range(n_shards + 1)]
    return [(a, min(b, n_images)) for a, b in zip(bounds, bounds[1:], strict=False) if a < min(b, n_images)]


def extract_shard(cfg_dict: dict, paths: Sequence[str], out_path: str | None = None, threads: int = 1) -> dict:
    """On a worker: patch embeddings of `paths` (in order). -> {"path": shard store} when out_path is given,
    else {"rows": (N, D) array}; with "weights_sha256" and "grid"."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = validate(cfg_dict, source="extract_shard")
    det = PatchCore(cfg)
    samples = [Sample(Path(p), "good", 0) for p in paths]
    images = image_stream(samples, cfg.data)
    out = {}
    if out_path is not None:
        store = det.extract_to_store(images, out_path)
        out["path"] = str(store.path)
    else:
        out["rows"] = det.extract(images).numpy()
    out.update({"weights_sha256": det.weights_.sha256, "grid": list(det.grid_ or ())})
    return out


def _local_client(n_workers: int, address: str | None):
    from dask.distributed import Client, LocalCluster

    if address:
        return Client(address), None
    scratch = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "dask-scratch-space"
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, local_directory=str(scratch))
    return Client(cluster), cluster


def extract_sharded(cfg: Config, paths: Sequence[str | Path], out_path: str | Path, n_workers: int = 2,
                    address: str | None = None, shared_dir: str | Path | None = None,
                    client=None) -> tuple[FeatureStore, dict]:
    """Extract on Dask workers and merge into one FeatureStore at out_path. `client`: an existing
    dask.distributed Client (else one for `address`, or a LocalCluster of n_workers x 1 thread).
    -> (store, timings {"extract_s", "merge_s", "shards"})."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("extract_sharded: no training images")
    shards = plan_shards(len(paths), cfg.data.batch_size, n_workers)
    own, cluster = (None, None) if client is not None else _local_client(n_workers, address)
    client = client or own
    cfg_dict = cfg.to_dict()
    t0 = time.perf_counter()
    try:
        shard_dir = Path(shared_dir) if shared_dir else None
        futures = [client.submit(extract_shard, cfg_dict, paths[a:b],
                                 str(shard_dir / f"shard-{i:04d}.safetensors") if shard_dir else None,
                                 pure=False) for i, (a, b) in enumerate(shards)]
        results = client.gather(futures)
    finally:
        if own is not None:
            own.close()
        if cluster is not None:
            cluster.close()
    t1 = time.perf_counter()
    store = _merge(cfg, results, Path(out_path))
    return store, {"extract_s": t1 - t0, "merge_s": time.perf_counter() - t1, "shards": len(shards)}


def _merge(cfg: Config, results: list[dict], out_path: Path) -> FeatureStore:
    """Shard results in order -> one store; refuses shards embedded with other backbone weights."""
    local = PatchCore(cfg)
    local._ensure_embedder()
    for i, res in enumerate(results):
        if res["weights_sha256"] != local.weights_.sha256:
            raise RuntimeError(f"shard {i} was embedded with backbone weights {res['weights_sha256'][:12]}…, "
                               f"this process has {local.weights_.sha256[:12]}…: the workers run another setup")
    meta = {"grid": ",".join(map(str, results[0]["grid"])), "shards": str(len(results))}
    if all("path" in r for r in results):
        return merge_stores([FeatureStore(r["path"]) for r in results], out_path, meta)
    dtype = cfg.detector.patchcore.feature_dtype
    with FeatureWriter(out_path, local.embedder_.embed_dim, dtype, meta) as writer:
        for res in results:
            writer.append(np.asarray(res["rows"]))
    return FeatureStore(out_path)


def fit_sharded(cfg: Config, paths: Sequence[str | Path], n_workers: int = 2, address: str | None = None,
                shared_dir: str | Path | None = None, work_dir: str | Path | None = None,
                client=None) -> PatchCore:
    """PatchCore fitted from features extracted on Dask workers (see module docstring). The merged store
    lives in `work_dir` (default: a temporary folder) and is removed after the fit."""
    from components.patchcore.streaming import Workspace

    own, cluster = (None, None) if client is not None else _local_client(n_workers, address)
    client = client or own
    try:
        with Workspace(work_dir) as ws:
            store, timing = extract_sharded(cfg, paths, ws.path(), n_workers, address, shared_dir, client)
            det = PatchCore(cfg).fit_store(store, extract_s=timing["extract_s"] + timing["merge_s"],
                                           map_fn=dask_map(client))
    finally:
        if own is not None:
            own.close()
        if cluster is not None:
            cluster.close()
    det.fit_stats_["extract_shards"] = float(timing["shards"])
    return det


def dask_map(client):
    """A `map` over a Dask client, in order: the sharded coreset's cells run as tasks on the workers
    (used when detector.patchcore.coreset_shards > 1)."""

    def mapped(fn, jobs):
        return client.gather(client.map(fn, list(jobs), pure=False))

    return mapped


# ------------------------------------------------------------------------------------------- Prefect
def run_extract_flow(cfg: Config, paths: Sequence[str | Path], out_path: str | Path, n_workers: int = 2,
                     address: str | None = None, shared_dir: str | Path | None = None) -> FeatureStore:
    """The same fan-out as a Prefect flow on prefect-dask's DaskTaskRunner: `address` points it at a
    running cluster (tcp://scheduler:8786), else a LocalCluster of n_workers x 1 thread. Each shard is
    one task run (retried by Prefect like any task). -> the merged store at out_path."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    shard_task = task(extract_shard, name="extract-shard", cache_policy=NO_CACHE)

    @flow(name="extract-sharded")
    def extract_flow(cfg_dict: dict, shards: list[list[str]], shard_dir: str | None) -> list[dict]:
        futures = [shard_task.submit(cfg_dict, chunk, f"{shard_dir}/shard-{i:04d}.safetensors" if shard_dir else None)
                   for i, chunk in enumerate(shards)]
        return [f.result() for f in futures]

    paths = [str(p) for p in paths]
    shards = [paths[a:b] for a, b in plan_shards(len(paths), cfg.data.batch_size, n_workers)]
    scratch = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "dask-scratch-space"
    runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "dashboard_address": None,
                        "local_directory": str(scratch)})
    results = extract_flow.with_options(task_runner=runner)(cfg.to_dict(), shards,
                                                             str(shared_dir) if shared_dir else None)
    return _merge(cfg, results, Path(out_path))
