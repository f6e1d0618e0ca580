"""Scoring cost of every method at batch 1, on a quiet machine: ms per image (median of repeats) at each
method's default resolution, with the default configuration otherwise (issue 18's 200 ms goal).

Scoring cost does not depend on the values of trained weights, only on the networks' shapes and on data
sizes (PatchCore's bank). So each method is fitted on the line's train images with its training steps cut
to a few (`--set` below; a Students teacher of 5 steps is cached like any other): the fit is quick and the
timed forward is the same computation as for a fully trained model. PatchCore fits in full (its bank size
sets its search cost). One child process per method; 2 threads; the first image is a warm-up.

    .venv/bin/python bench/latency.py                                   # cookie, 20 test images
    .venv/bin/python bench/latency.py --out docs/results/latency        # also writes .md and .json
    .venv/bin/python bench/latency.py --methods students --set students:detector.students.dense_stride=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from child import NO_CALIBRATION, ROOT, peak_rss_mb, run_worker, scoped_sets
from mdtable import markdown

DATASETS = ROOT.parent / "shared" / "datasets"
METHODS = ("patchcore", "dinomaly", "students", "divide_assemble", "transformaly")
SHORT_TRAINING = {  # steps cut for speed: scoring cost does not depend on the trained values
    "dinomaly": ["detector.dinomaly.iterations=2", "detector.dinomaly.warmup_steps=1"],
    "students": ["detector.students.iterations=2", "detector.students.teacher_iterations=5"],
    "divide_assemble": ["detector.divide_assemble.iterations=2"],
    "transformaly": ["detector.transformaly.epochs=1"],
}


def run_one(method: str, line: str, sets: list[str], threads: int, n_images: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from components.config import load_config
    from components.data import iter_batches, scan_line
    from components.training import fit_line, preprocess_for

    cfg = load_config(ROOT / "params.yaml", [f"detector.method={method}", *NO_CALIBRATION,
                                             f"detector.{method}.threads={threads}", *sets])
    t0 = time.perf_counter()
    fitted = fit_line(cfg, DATASETS / line, None)
    fit_s = time.perf_counter() - t0
    det = fitted.detector
    images = [b.images for b in iter_batches(scan_line(DATASETS / line).test[:n_images], preprocess_for(cfg.data), 1)]
    det.score(images[0])  # warm-up
    per_pass = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in images:
            det.score(x)
        per_pass.append((time.perf_counter() - t) / len(images))
    h, w = images[0].shape[-2:]
    return {"method": method, "line": line, "px": f"{h}x{w}", "ms_b1": 1000 * statistics.median(per_pass),
            "ms_b1_min": 1000 * min(per_pass), "fit_s_short": fit_s, "threads": threads,
            "peak_rss_mb": peak_rss_mb(), "sets": sets, "load": os.getloadavg()[0]}


def method_sets(method: str, sets: list[str]) -> list[str]:
    return [*SHORT_TRAINING.get(method, []), *scoped_sets(method, sets, METHODS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--line", default="cookie")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value or METHOD:key=value")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args.line, args.sets, args.threads, args.images, args.repeats)))
        return
    rows = []
    for method in args.methods:
        extra = ["--line", args.line, "--images", str(args.images), "--repeats", str(args.repeats),
                 *[f"--set={s}" for s in method_sets(method, args.sets)]]
        row = run_worker(__file__, [method], args.threads, extra, method)
        if row is not None:
            rows.append(row)
            print(f"done {method}: {row['ms_b1']:.1f} ms/image", file=sys.stderr, flush=True)
    cells = [["method", "line", "px", "ms/image (b1, median)", "min", "threads", "peak RSS MB", "load"]]
    cells += [[r["method"], r["line"], r["px"], f"{r['ms_b1']:.1f}", f"{r['ms_b1_min']:.1f}", str(r["threads"]),
               f"{r['peak_rss_mb']:.0f}", f"{r['load']:.2f}"] for r in rows]
    text = markdown(cells)
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        args.out.with_suffix(".md").write_text(f"<!-- written by bench/latency.py; do not edit -->\n\n{text}\n")


if __name__ == "__main__":
    main()
