"""What the bench scripts share besides tables (imported as `child`: bench/ is their sys.path[0]): one child
process per configuration, so each run's peak RSS is its own, and interleaved forward/score timings."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Overrides for "every train image fitted, no threshold calibration" (as anomalib): the fraction alone no
# longer says so since crossfit became the default calibration (it would fit `threshold.folds` more detectors
# on all the train images first); holdout with fraction 0 fits one detector and calibrates nothing.
NO_CALIBRATION = ("threshold.calibration=holdout", "data.calibration_fraction=0")


def scoped_sets(method: str, sets: list[str], methods: tuple[str, ...]) -> list[str]:
    """The `--set` values that apply to `method`: `key=value` (every method) and `METHOD:key=value` with
    METHOD == method (a `key` holding a colon, e.g. a path, is not taken for a method name)."""
    out = []
    for s in sets:
        head, sep, rest = s.partition(":")
        if sep and head in methods and "=" not in head:
            if head == method:
                out.append(rest)
        else:
            out.append(s)
    return out


def run_worker(script: str, worker: list[str], threads: int, extra: list[str] | None = None,
               label: str = "") -> dict | list | None:
    """Run `script --worker *worker --threads N *extra` in a child with OMP_NUM_THREADS=N; -> the JSON on
    its last stdout line, or None (its stderr tail printed) when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, script, "--worker", *worker, "--threads", str(threads), *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f"{label or ' '.join(worker)} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB. Not getrusage's ru_maxrss: Linux carries that across
    exec, so a child started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(det, images, repeats: int) -> tuple[float, float, float]:
    """Median seconds of (the frozen backbone forward alone, the frozen network forward inference runs
    (backbone + patch pooling as one graph, `det.embedder_`), det.score) on `images` (B, 3, H, W). The
    network forward and det.score alternate, so machine load hits both alike; the backbone alone is timed
    in its own block before (alternating two graphs would evict each other's pre-packed weights). Both
    forwards run on the chunks of data.batch_size images that det.score feeds its network."""
    import torch

    def median_of(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(images)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    chunks = images.split(det.cfg.data.batch_size)  # what score feeds the network: data.batch_size at a time

    def backbone_forward(_):
        for chunk in chunks:
            det.embedder_.extractor.frozen(chunk)

    def network_forward():
        for chunk in chunks:
            det.embedder_(chunk)

    network, score = [], []
    with torch.inference_mode():
        backbone_forward(None)
        backbone = median_of(backbone_forward)
        network_forward()
        det.score(images)
        for _ in range(repeats):
            t = time.perf_counter()
            network_forward()
            network.append(time.perf_counter() - t)
            t = time.perf_counter()
            det.score(images)
            score.append(time.perf_counter() - t)
    return backbone, statistics.median(network), statistics.median(score)
