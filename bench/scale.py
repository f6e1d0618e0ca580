"""How PatchCore's fit cost grows with the number of training images: in-memory against streamed features,
and feature extraction sharded over Dask workers.

Synthetic good images (seeded smoothed-noise textures, generated in memory; no dataset needed) go through
the real backbone (params.yaml's, mobilenetv2_100 by default). Every row runs in its own child process, so
its peak RSS (ru_maxrss) is that fit's alone. Columns: images, patches, mode, base RSS (after loading the
model, before the fit), peak RSS, extraction s, coreset s, total fit s, bank size, feature bytes (N x D in
feature_dtype: on disk when streamed, in RAM otherwise).

    .venv/bin/python bench/scale.py                                   # 1k, 5k, 20k images at 64 px, coreset 1 %
    .venv/bin/python bench/scale.py --sizes 200 1000 --modes memory stream
    .venv/bin/python bench/scale.py --image-size 256 --sizes 1000    # the production size (1024 patches/image)
    .venv/bin/python bench/scale.py --mode-sharded --sizes 400 --workers 2   # Dask speed-up (extraction only)

Why the defaults are small: the greedy coreset costs O(N * M * d) = ratio * N^2 * d, so at 256 px (1024
patches per image) and coreset 10 %, 20k images are 20M patches and 2M greedy steps over a 10 GB matrix,
days on two cores. The table states the image size, patches per image and coreset ratio it used.
`--memory-limit-mb` skips in-memory rows whose features alone would exceed it (they would not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_batches(n: int, size: int, batch: int, seed: int = 0):
    """(B, 3, size, size) float batches in [0, 1]: smoothed seeded noise, a different texture per image."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    kernel = torch.ones(3, 1, 5, 5) / 25.0
    for start in range(0, n, batch):
        b = min(batch, n - start)
        noise = torch.randn(b, 3, size + 4, size + 4, generator=g)
        smooth = F.conv2d(noise, kernel, groups=3)
        scale = 0.1 + 0.1 * torch.rand(b, 1, 1, 1, generator=g)
        yield (0.5 + scale * smooth / smooth.std()).clamp(0, 1)


def config(args, extra: list[str]):
    from components.config import load_config

    sets = [f"data.image_size=[{args.image_size}, {args.image_size}]", "data.calibration_fraction=0",
            f"detector.patchcore.coreset_ratio={args.coreset_ratio}", f"detector.patchcore.threads={args.threads}",
            f"detector.patchcore.feature_dtype={args.feature_dtype}", *args.sets, *extra]
    return load_config(ROOT / "params.yaml", sets)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fit(args, n: int, mode: str) -> dict:
    import torch

    from components.patchcore import PatchCore

    torch.set_num_threads(args.threads)
    stream = {"memory": "false", "stream": "true"}[mode]
    cfg = config(args, [f"detector.patchcore.stream_features={stream}"])
    det = PatchCore(cfg)
    det._ensure_embedder()
    next(iter(synthetic_batches(1, args.image_size, 1)))
    base = rss_mb()
    t = time.perf_counter()
    det.fit(synthetic_batches(n, args.image_size, cfg.data.batch_size))
    total = time.perf_counter() - t
    s = det.fit_stats_
    item = 2 if args.feature_dtype == "float16" else 4
    return {"images": n, "patches": int(s["n_patches"]), "mode": mode, "base_rss_mb": base, "peak_rss_mb": rss_mb(),
            "extract_s": s["extract_s"], "coreset_s": s["coreset_s"], "fit_s": total, "bank": int(s["bank_size"]),
            "feature_mb": s["n_patches"] * s["embed_dim"] * item / 2**20, "on_disk": mode == "stream"}


def run_sharded(args, n: int) -> dict:
    """Extraction only: one process vs extract_sharded on a LocalCluster of args.workers x 1 thread, from
    the same PNG files; checks the merged store equals the single-process one."""
    import numpy as np
    import torch
    from dask.distributed import Client, LocalCluster
    from PIL import Image

    from components.data import Sample
    from components.patchcore import PatchCore
    from components.training import image_stream
    from flows.sharded import extract_sharded

    torch.set_num_threads(args.threads)
    cfg = config(args, [])
    with tempfile.TemporaryDirectory(prefix="scale-sharded-") as tmp:
        tmp = Path(tmp)
        paths, i = [], 0
        for batch in synthetic_batches(n, args.image_size, 64):
            for image in batch:
                path = tmp / f"{i:06d}.png"
                Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
                paths.append(path)
                i += 1
        t = time.perf_counter()
        single = PatchCore(cfg).extract_to_store(image_stream([Sample(p, "good", 0) for p in paths], cfg.data),
                                                 tmp / "single.safetensors")
        single_s = time.perf_counter() - t
        t = time.perf_counter()
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          local_directory=str(tmp / "dask")) as cluster, Client(cluster) as client:
            start_s = time.perf_counter() - t
            client.run(lambda: __import__("components.patchcore.detector"))  # imports paid before timing
            merged, timing = extract_sharded(cfg, paths, tmp / "merged.safetensors", args.workers, client=client,
                                             shared_dir=tmp)
        same = bool(np.array_equal(single.read(), merged.read()))
    sharded_s = timing["extract_s"] + timing["merge_s"]
    return {"images": n, "patches": len(single), "workers": args.workers, "single_s": single_s,
            "cluster_start_s": start_s, "sharded_s": sharded_s, "speedup": single_s / sharded_s, "identical": same}


def print_rows(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    print(table(rows, [(c, c, s) for c, s in cols]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", type=int, default=[1000, 5000, 20000])
    parser.add_argument("--modes", nargs="*", default=["memory", "stream"], choices=["memory", "stream"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit-mb", type=float, default=None)
    parser.add_argument("--mode-sharded", action="store_true", help="Dask extraction speed-up instead")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        n, mode = int(args.worker[0]), args.worker[1]
        print(json.dumps(run_sharded(args, n) if mode == "sharded" else run_fit(args, n, mode)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    passthrough, skip = [], False
    for arg in sys.argv[1:]:  # every option but --json goes to the child
        if not skip and not arg.startswith("--json"):
            passthrough.append(arg)
        skip = arg == "--json"
    rows = []
    modes = ["sharded"] if args.mode_sharded else args.modes
    for n in args.sizes:
        for mode in modes:
            if mode == "memory" and args.memory_limit_mb and n * (args.image_size // 8) ** 2 * 128 * 2 / 2**20 > \
                    args.memory_limit_mb:
                print(f"skip {n} {mode}: over --memory-limit-mb", file=sys.stderr)
                continue
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", str(n), mode],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{n} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"done {n} {mode}", file=sys.stderr, flush=True)
    print(f"image size {args.image_size} px, coreset ratio {args.coreset_ratio}, feature dtype {args.feature_dtype}, "
          f"{args.threads} threads")
    if args.mode_sharded:
        print_rows(rows, [("images", "d"), ("patches", "d"), ("workers", "d"), ("single_s", ".1f"),
                          ("cluster_start_s", ".1f"), ("sharded_s", ".1f"), ("speedup", ".2f"), ("identical", "")])
    else:
        print_rows(rows, [("images", "d"), ("patches", "d"), ("mode", "s"), ("base_rss_mb", ".0f"),
                          ("peak_rss_mb", ".0f"), ("extract_s", ".1f"), ("coreset_s", ".1f"), ("fit_s", ".1f"),
                          ("bank", "d"), ("feature_mb", ".1f"), ("on_disk", "")])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    import components  # noqa: F401  (makes torchvision, and so timm, importable)

    main()
