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


def interleaved(det, images, repeats: int) -> tuple[float, float]:
    """Median seconds of the frozen backbone forward (what PatchCore's inference runs) and of det.score on
    `images` (B, 3, H, W), alternating so machine load hits both alike (one untimed call of each first)."""
    import torch

    forward, score = [], []
    with torch.inference_mode():
        det.embedder_.extractor.frozen(images)
        det.score(images)
        for _ in range(repeats):
            t = time.perf_counter()
            det.embedder_.extractor.frozen(images)
            forward.append(time.perf_counter() - t)
            t = time.perf_counter()
            det.score(images)
            score.append(time.perf_counter() - t)
    return statistics.median(forward), statistics.median(score)
