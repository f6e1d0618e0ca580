"""Greedy coreset on a synthetic bank: ours (components.coreset.greedy_coreset) vs anomalib's KCenterGreedy.

Needs the benchmark environment (anomalib lives only there):

    make bench-env
    .venv-bench/bin/python bench/coreset.py                              # 200,000 x 1024, ratios 1 % and 10 %
    .venv-bench/bin/python bench/coreset.py --timeout 900                # cap each anomalib run at 15 min
    .venv-bench/bin/python bench/coreset.py --n 20000 --ratios 0.01      # smoke test

Data: N x D float32 (default 200,000 x 1024), seeded (--seed): a mixture of 64 Gaussians with
Dirichlet(1) weights; centres ~ N(0, I); each component is its centre plus a rank-16 Gaussian (random
(16, D) basis, per-component scale uniform in [0.2, 0.6], so spreads of about 6-19 against centre
distances of about 45) plus isotropic N(0, 0.05^2) noise; rows shuffled. Structure at several scales, as
patch features have, rather than an isotropic blob.

Each selection runs in its own child process (same thread count; peak RSS is the child's), timed from the
features in memory to the indices (projections included: ours a 128-dim Gaussian JL projection, anomalib
its sparse random projection with eps=0.9). The coverage radius, max over all points of the L2 distance
to the nearest selected point, is then computed exactly in the full D dims for every selection (faiss flat
index over the selected points, every point searched). An anomalib run that passes --timeout is stopped:
the table shows the steps it completed and the time extrapolated linearly to all steps (no radius).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
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


def coverage_radius(points: np.ndarray, selected: np.ndarray, threads: int, block: int = 16384) -> float:
    """Max over points of the L2 distance to the nearest selected point, exact.

    points (N, D) float32, selected (M,) indices -> radius."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(points[selected]))
    worst = 0.0
    for start in range(0, len(points), block):
        sq, _ = index.search(np.ascontiguousarray(points[start : start + block]), 1)
        worst = max(worst, float(sq.max()))
    return float(np.sqrt(max(worst, 0.0)))


# ------------------------------------------------------------------------------------------ child side
def run_child(impl: str, data_path: Path, ratio: float, seed: int, out_path: Path, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import components.torchvision_compat  # noqa: F401  (before anomalib imports torchvision)

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    features = torch.from_numpy(np.load(data_path))
    print("START", file=sys.stderr, flush=True)  # the parent's --timeout counts from here (imports excluded)
    t = time.perf_counter()
    if impl == "ours":
        from components.coreset import greedy_coreset

        indices = greedy_coreset(features, ratio, seed).numpy()
    else:
        indices = np.asarray(_anomalib_select(features, ratio), dtype=np.int64)
    seconds = time.perf_counter() - t
    np.save(out_path, indices)
    return {
        "seconds": seconds,
        "selected": len(indices),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _anomalib_select(features, ratio: float) -> list[int]:
    """anomalib's KCenterGreedy, reporting its step count on stderr every ~5 s (read back on timeout)."""
    from anomalib.models.components.sampling import KCenterGreedy

    sampler = KCenterGreedy(embedding=features, sampling_ratio=ratio)
    update, state = (
        sampler.update_distances,
        {"steps": 0, "last": time.perf_counter(), "t0": time.perf_counter()},
    )

    def counted(cluster_center):
        update(cluster_center)
        state["steps"] += 1
        now = time.perf_counter()
        if now - state["last"] > 5:
            state["last"] = now
            print(
                f"PROGRESS {state['steps']} {sampler.coreset_size} {now - state['t0']:.3f}",
                file=sys.stderr,
                flush=True,
            )

    sampler.update_distances = counted
    return sampler.select_coreset_idxs()


# ----------------------------------------------------------------------------------------- parent side
def run_selection(impl: str, data_path: Path, ratio: float, args, workdir: Path) -> dict:
    out_path = workdir / f"{impl}_{ratio}.npy"
    log_path = workdir / f"{impl}_{ratio}.log"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        str(data_path),
        str(ratio),
        str(out_path),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        **({"MALLOC_MMAP_THRESHOLD_": "131072"} if impl == "anomalib" else {}),  # see bench/speed.py
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    timeout = args.timeout if impl == "anomalib" else None
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
    return {
        "impl": impl,
        "ratio": ratio,
        "timed_out": False,
        "indices": str(out_path),
        **json.loads(stdout.strip().splitlines()[-1]),
    }


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
    return {
        "steps_done": int(done),
        "steps_total": int(total),
        "seconds_at_timeout": timeout,
        "estimated_seconds": float(elapsed) * int(total) / max(int(done), 1),
    }


def print_table(rows: list[dict]) -> None:
    head = (
        "| ratio | impl | selected | seconds | peak RSS MB | coverage radius | speed-up (anomalib / ours) "
        "| radius ours / anomalib |"
    )
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for ratio in dict.fromkeys(r["ratio"] for r in rows):
        pair = {r["impl"]: r for r in rows if r["ratio"] == ratio}
        for impl, r in pair.items():
            if r["timed_out"]:
                secs = (
                    f"> {r['seconds_at_timeout']:.0f} (stopped at {r.get('steps_done', 0)}/"
                    f"{r.get('steps_total', '?')} steps; est. {r.get('estimated_seconds') or 0:.0f})"
                )
            else:
                secs = f"{r['seconds']:.1f}"
            radius = "-" if r.get("radius") is None else f"{r['radius']:.3f}"
            rss = "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
            speed, rad = "", ""
            if impl == "ours" and "anomalib" in pair:
                other = pair["anomalib"]
                theirs = other.get("seconds") if not other["timed_out"] else other.get("estimated_seconds")
                if theirs:
                    speed = f"{theirs / r['seconds']:.1f}x" + (" (est.)" if other["timed_out"] else "")
                if other.get("radius") and r.get("radius"):
                    rad = f"{r['radius'] / other['radius']:.3f}"
            print(
                f"| {ratio:g} | {impl} | {r.get('selected', '-')} | {secs} | {rss} | {radius} "
                f"| {speed} | {rad} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.01, 0.1])
    parser.add_argument("--impls", nargs="*", default=["ours", "anomalib"], choices=["ours", "anomalib"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per anomalib run (default: none)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "DATA", "RATIO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, data, ratio, out = args.worker
        print(json.dumps(run_child(impl, Path(data), float(ratio), args.seed, Path(out), args.threads)))
        return
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at start", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="coreset-bench-") as tmp:
        workdir = Path(tmp)
        points = synthetic_bank(args.n, args.dim, args.seed)
        np.save(workdir / "bank.npy", points)
        rows = []
        for ratio in args.ratios:
            for impl in args.impls:
                row = run_selection(impl, workdir / "bank.npy", ratio, args, workdir)
                if not row["timed_out"]:
                    t = time.perf_counter()
                    row["radius"] = coverage_radius(points, np.load(row.pop("indices")), args.threads)
                    row["radius_s"] = time.perf_counter() - t
                rows.append(row)
                print(f"done {impl} at {ratio:g}: {row}", file=sys.stderr, flush=True)
    print(
        f"{args.n} x {args.dim} float32, mixture of {COMPONENTS} rank-{RANK} Gaussians, seed {args.seed}, "
        f"{args.threads} threads"
    )
    print_table(rows)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
