"""Greedy coreset selection: ours (exact rounds, and the sharded composable variant) against the
one-pick-per-pass loop this project used before (2026-11-23) and anomalib's KCenterGreedy.

    .venv/bin/python bench/coreset.py --line pcb --size 640 --n 640000 --ratios 0.1     # real patches
    .venv/bin/python bench/coreset.py --line pcb --size 640 --ratios 0.1 --impls rounds sharded:2 sharded:4
    .venv-bench/bin/python bench/coreset.py --impls rounds anomalib --timeout 900      # + anomalib (bench env)
    .venv/bin/python bench/coreset.py --n 20000 --ratios 0.01                            # smoke test

Data: `--line L --size S`: the PatchCore patch embeddings (params.yaml defaults: mobilenetv2_100 levels
2 and 3, 128 dims) of every train/good image of ../shared/datasets/L at S x S px, the first `--n` rows;
without `--line`: N x D float32 (default 200,000 x 1024), a seeded mixture of 64 Gaussians with
Dirichlet(1) weights, each its centre ~ N(0, I) plus a rank-16 Gaussian (scale uniform in [0.2, 0.6]) plus
isotropic N(0, 0.05^2) noise (structure at several scales, as patch features have).

Implementations (`--impls`), each in its own child process (same threads; peak RSS is the child's), timed
from the features in memory to the indices, the 128-dim Gaussian projection included (none when D = 128):
- `before`: the loop this project shipped until this change: one matrix-vector product over all N points
  per pick (kept here, verbatim in substance, as the reference);
- `rounds`: components.coreset.greedy_coreset (exact rounds; the default);
- `sharded:S`: components.coreset.sharded_coreset over S k-means cells;
- `anomalib`: anomalib 2.7's KCenterGreedy (only in the bench environment).
A run that passes `--timeout` (before, anomalib) is stopped; the table then shows the time extrapolated
linearly from the picks done (each pick costs the same there) and no radius.

Columns: the exact coverage radius (max over all points of the L2 distance to the nearest selected point,
in the space the selection ran in: the projection for D > 128; faiss flat search of every point), its
ratio to `before`'s (or to `rounds`' when `before` did not finish), the speed-up over `before`, and
whether the picks equal `before`'s, index for index.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from child import peak_rss_mb
from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
COMPONENTS, RANK, NOISE = 64, 16, 0.05


def synthetic_bank(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 mixture of low-rank Gaussians (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    weights = -torch.log(torch.rand(COMPONENTS, generator=g))  # Gamma(1) draws: normalised, Dirichlet(1)
    counts = torch.multinomial(weights, n, replacement=True, generator=g).bincount(minlength=COMPONENTS)
    out = torch.empty(n, dim)
    start = 0
    for count in counts.tolist():
        centre = torch.randn(dim, generator=g)
        scale = 0.2 + 0.4 * torch.rand(1, generator=g)
        basis = torch.randn(RANK, dim, generator=g) * scale / RANK**0.5
        block = torch.randn(count, RANK, generator=g) @ basis + centre
        out[start : start + count] = block + NOISE * torch.randn(count, dim, generator=g)
        start += count
    return out[torch.randperm(n, generator=g)].numpy()


def line_features(line: str, size: int, n: int | None, threads: int) -> np.ndarray:
    """PatchCore embeddings of every train/good image of a shared line at size x size -> (N, 128)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from components.config import load_config
    from components.data import scan_line
    from components.detector import create_detector
    from components.training import image_stream

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "params.yaml", [f"data.image_size=[{size}, {size}]", "data.resize=resize",
                                             f"detector.patchcore.threads={threads}"])
    split = scan_line(DATASETS / line, require_test=False)
    det = create_detector(cfg)
    t = time.perf_counter()
    feats = det.extract(image_stream(split.train, cfg.data)).float().numpy()
    print(f"extracted {feats.shape} from {len(split.train)} images in {time.perf_counter() - t:.1f} s",
          file=sys.stderr, flush=True)
    return np.ascontiguousarray(feats[:n] if n else feats)


def projected(points: np.ndarray, seed: int) -> np.ndarray:
    """The space the selections run in: the 128-dim projection (identity for D <= 128)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from components.coreset import random_projection

    return random_projection(torch.from_numpy(points), 128, seed).numpy()


def coverage_radius(points: np.ndarray, selected: np.ndarray, threads: int, block: int = 65536) -> float:
    """Max over points of the L2 distance to the nearest selected point, exact. points (N, d), selected (M,)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    centres = np.ascontiguousarray(points[selected])
    worst = 0.0
    for start in range(0, len(points), block):
        sq, _ = faiss.knn(np.ascontiguousarray(points[start : start + block]), centres, 1)
        worst = max(worst, float(sq.max()))
    return float(np.sqrt(max(worst, 0.0)))


# ------------------------------------------------------------------------------------------ child side
def before_greedy(xp, ratio: float, seed: int):
    """The one-pick-per-pass loop this project shipped before exact rounds: xp (N, d) float32 -> (M,)."""
    import torch

    from components.coreset import coreset_size

    xt = xp.T.contiguous()  # (d, N): one vector-matrix product per pick streams the points once
    n = xt.shape[1]
    m = coreset_size(n, ratio)
    sq_norms = (xt * xt).sum(0)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    selected = torch.empty(m, dtype=torch.long)
    selected[0] = start

    def dist_to(idx: int):
        return torch.mm(xt[:, idx].unsqueeze(0), xt).squeeze(0).mul_(-2).add_(sq_norms).add_(sq_norms[idx]).clamp_(min=0)

    min_dist = dist_to(start)
    t0 = last = time.perf_counter()
    for i in range(1, m):
        idx = int(torch.argmax(min_dist))
        selected[i] = idx
        torch.minimum(min_dist, dist_to(idx), out=min_dist)
        if time.perf_counter() - last > 5:
            last = time.perf_counter()
            print(f"PROGRESS {i + 1} {m} {last - t0:.3f}", file=sys.stderr, flush=True)
    return selected.numpy()


def run_child(impl: str, data_path: Path, ratio: float, seed: int, out_path: Path, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import components.torchvision_compat  # noqa: F401  (before anomalib imports torchvision)
    from components import coreset, knn

    torch.set_num_threads(threads)
    knn.set_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    features = torch.from_numpy(np.load(data_path))
    print("START", file=sys.stderr, flush=True)  # the parent's --timeout counts from here (imports excluded)
    t = time.perf_counter()
    if impl == "rounds":
        indices = coreset.greedy_coreset(features, ratio, seed).numpy()
    elif impl.startswith("sharded:"):
        indices = coreset.select_coreset(features, ratio, seed, shards=int(impl.split(":")[1])).indices.numpy()
    elif impl == "before":
        indices = before_greedy(coreset.random_projection(features, 128, seed), ratio, seed)
    else:
        indices = np.asarray(_anomalib_select(features, ratio), dtype=np.int64)
    seconds = time.perf_counter() - t
    np.save(out_path, indices)
    return {"seconds": seconds, "selected": len(indices),
            "peak_rss_mb": peak_rss_mb()}


def _anomalib_select(features, ratio: float) -> list[int]:
    """anomalib's KCenterGreedy, reporting its step count on stderr every ~5 s (read back on timeout)."""
    from anomalib.models.components.sampling import KCenterGreedy

    sampler = KCenterGreedy(embedding=features, sampling_ratio=ratio)
    update, state = sampler.update_distances, {"steps": 0, "last": time.perf_counter(), "t0": time.perf_counter()}

    def counted(cluster_center):
        update(cluster_center)
        state["steps"] += 1
        now = time.perf_counter()
        if now - state["last"] > 5:
            state["last"] = now
            print(f"PROGRESS {state['steps']} {sampler.coreset_size} {now - state['t0']:.3f}", file=sys.stderr,
                  flush=True)

    sampler.update_distances = counted
    return sampler.select_coreset_idxs()


# ----------------------------------------------------------------------------------------- parent side
def run_selection(impl: str, data_path: Path, ratio: float, args, workdir: Path) -> dict:
    tag = impl.replace(":", "_")
    out_path, log_path = workdir / f"{tag}_{ratio}.npy", workdir / f"{tag}_{ratio}.log"
    cmd = [sys.executable, __file__, "--worker", impl, str(data_path), str(ratio), str(out_path),
           "--seed", str(args.seed), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           **({"MALLOC_MMAP_THRESHOLD_": "131072"} if impl == "anomalib" else {}),  # see bench/speed.py
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    timeout = args.timeout if impl in ("anomalib", "before") else None
    with open(log_path, "w") as log, open(workdir / "stdout.txt", "w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=log, text=True, env=env, cwd=ROOT)
        if not _wait(proc, log_path, timeout):
            proc.kill()
            proc.wait()
            return {"impl": impl, "ratio": ratio, "timed_out": True, **_progress(log_path, args.timeout)}
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} at {ratio} failed:\n{log_path.read_text()[-3000:]}")
    return {"impl": impl, "ratio": ratio, "timed_out": False, "indices": str(out_path),
            **json.loads(stdout.strip().splitlines()[-1])}


def _wait(proc: subprocess.Popen, log_path: Path, timeout: float | None) -> bool:
    """Wait for the child; False when it ran past `timeout` seconds after it printed START."""
    started = None
    while proc.poll() is None:
        time.sleep(0.5)
        if started is None and "START" in log_path.read_text():
            started = time.perf_counter()
        if timeout is not None and started is not None and time.perf_counter() - started > timeout:
            return False
    return True


def _progress(log_path: Path, timeout: float) -> dict:
    lines = [ln.split() for ln in log_path.read_text().splitlines() if ln.startswith("PROGRESS")]
    if not lines:
        return {"seconds": None, "steps_done": 0}
    _, done, total, elapsed = lines[-1]
    return {"steps_done": int(done), "selected": int(total), "seconds": None,
            "estimated_seconds": float(elapsed) * int(total) / max(int(done), 1)}


def compare(rows: list[dict]) -> list[dict]:
    """Add speed-up over `before`, radius ratio (to before, else rounds) and same-picks columns."""
    out = []
    for ratio in dict.fromkeys(r["ratio"] for r in rows):
        group = {r["impl"]: r for r in rows if r["ratio"] == ratio}
        before = group.get("before")
        ref_radius = (before or {}).get("radius") or group.get("rounds", {}).get("radius")
        before_s = None if before is None else (before.get("seconds") or before.get("estimated_seconds"))
        for r in group.values():
            r = dict(r)
            r["time"] = (f"{r['seconds']:.1f}" if r.get("seconds") is not None
                         else f"> {args_timeout(r)} (est. {r.get('estimated_seconds') or 0:.0f})")
            if before_s and r.get("seconds"):
                r["speedup"] = f"{before_s / r['seconds']:.1f}x" + (" (est.)" if before["timed_out"] else "")
            if ref_radius and r.get("radius"):
                r["radius_ratio"] = r["radius"] / ref_radius
            if before is not None and before.get("picks") is not None and r.get("picks") is not None:
                r["same"] = same_picks(r["picks"], before["picks"])
            out.append(r)
    return out


def same_picks(got: np.ndarray, ref: np.ndarray) -> str:
    """"yes" (same indices, same order), "same set" (float near-ties swapped), else how many differ."""
    if np.array_equal(got, ref):
        return "yes"
    if len(got) == len(ref) and np.array_equal(np.sort(got), np.sort(ref)):
        return "same set"
    return f"{len(np.setdiff1d(got, ref))} of {len(ref)} differ"


def args_timeout(row: dict) -> str:
    return f"{row.get('timeout', 0):.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line", default=None, help="real patches of ../shared/datasets/LINE (default: synthetic)")
    parser.add_argument("--size", type=int, default=256, help="image size for --line")
    parser.add_argument("--n", type=int, default=None, help="rows (synthetic default 200,000; --line: all)")
    parser.add_argument("--dim", type=int, default=1024, help="synthetic dims")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.01, 0.1])
    parser.add_argument("--impls", nargs="*", default=["before", "rounds", "sharded:4"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per before/anomalib run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "DATA", "RATIO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, data, ratio, out = args.worker
        print(json.dumps(run_child(impl, Path(data), float(ratio), args.seed, Path(out), args.threads)))
        return
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at start", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="coreset-bench-") as tmp:
        workdir = Path(tmp)
        if args.line:
            points = line_features(args.line, args.size, args.n, args.threads)
            what = f"{args.line} at {args.size} px: {points.shape[0]} x {points.shape[1]} patch embeddings"
        else:
            points = synthetic_bank(args.n or 200_000, args.dim, args.seed)
            what = f"{points.shape[0]} x {points.shape[1]} float32, mixture of {COMPONENTS} rank-{RANK} Gaussians"
        np.save(workdir / "bank.npy", points)
        space = projected(points, args.seed)
        del points
        rows = []
        for ratio in args.ratios:
            for impl in args.impls:
                row = run_selection(impl, workdir / "bank.npy", ratio, args, workdir)
                row["timeout"] = args.timeout or 0
                if not row["timed_out"]:
                    row["picks"] = np.load(row.pop("indices"))
                    row["radius"] = coverage_radius(space, row["picks"], args.threads)
                rows.append(row)
                print(f"done {impl} at {ratio:g}: { {k: v for k, v in row.items() if k != 'picks'} }",
                      file=sys.stderr, flush=True)
    print(f"{what}, seed {args.seed}, {args.threads} threads")
    print(table(compare(rows), [("ratio", "ratio", "g"), ("impl", "impl", ""), ("selected", "selected", ""),
                                ("time", "seconds", ""), ("speedup", "speed-up over before", ""),
                                ("peak_rss_mb", "peak RSS MB", ".0f"), ("radius", "coverage radius", ".4f"),
                                ("radius_ratio", "radius / before's", ".4f"), ("same", "same picks as before", "")]))
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "picks"} for r in rows], indent=2))


if __name__ == "__main__":
    main()
