"""Accuracy and cost of each detector on every line in ../shared/datasets, for each packaged backbone.

Each (line, backbone) runs in its own child process so peak RSS is that run's alone. Prints a table:
image AUROC, pixel AUROC, AUPRO, fit seconds, inference ms/image at batch 1, peak RSS.

    .venv/bin/python bench/accuracy.py                       # every line, every packaged backbone
    .venv/bin/python bench/accuracy.py --lines cookie --backbones mobilenetv2_100 --set detector.patchcore.coreset_ratio=0.01

Defaults follow the anomalib comparison in docs/patchcore.md: 256 px, coreset 10 %, 2 threads, all train images
fitted (no calibration hold-out, as anomalib), pcb limited to its first 50 train images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from child import NO_CALIBRATION, peak_rss_mb, run_worker
from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
BACKBONES = ("mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
MAX_TRAIN = {"pcb": 50}


def run_one(line: str, backbone: str, overrides: list[str], threads: int, max_train: int | None) -> dict:
    """Fit and evaluate in this process; returns the row."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from components.config import load_config
    from components.data import iter_batches, scan_line
    from components.evaluation import evaluate_split
    from components.training import fit_line, preprocess_for

    sets = [f"backbone.name={backbone}", *NO_CALIBRATION, *overrides]
    detector = load_config(ROOT / "params.yaml", sets).detector
    if "threads" in type(getattr(detector, detector.method)).model_fields:
        sets.insert(2, f"detector.{detector.method}.threads={threads}")  # the configured method's; --set still wins
    cfg = load_config(ROOT / "params.yaml", sets)
    t0 = time.perf_counter()
    fitted = fit_line(cfg, DATASETS / line, max_train)
    fit_s = time.perf_counter() - t0
    det = fitted.detector
    result = evaluate_split(det, scan_line(DATASETS / line), cfg)
    # batch-1 latency on decoded tensors: the model's cost, not PNG decoding
    images = [b.images for b in iter_batches(fitted.split.test[:20], preprocess_for(cfg.data), 1)]
    det.score(images[0])
    t = time.perf_counter()
    for x in images:
        det.score(x)
    ms_b1 = 1000 * (time.perf_counter() - t) / len(images)
    stats = getattr(det, "fit_stats_", {})
    o = result.report.overall
    return {"line": line, "method": cfg.detector.method, "backbone": backbone,
            "n_train": fitted.n_fit, "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"],
            "aupro": o["aupro"], "fit_s": fit_s, "coreset_s": stats.get("coreset_s"),
            "embed_dim": stats.get("embed_dim"), "ms_b1": ms_b1,
            "peak_rss_mb": peak_rss_mb()}


def print_table(rows: list[dict]) -> None:
    cols = [("line", "line", "s"), ("method", "method", "s"), ("backbone", "backbone", "s"),
            ("n_train", "train", "d"), ("embed_dim", "dim", ".0f"), ("image_auroc", "img AUROC", ".3f"),
            ("pixel_auroc", "px AUROC", ".3f"), ("aupro", "AUPRO", ".3f"), ("fit_s", "fit s", ".1f"),
            ("coreset_s", "coreset s", ".1f"), ("ms_b1", "ms/img b1", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f")]
    print(table(rows, cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", nargs="*", default=None, help="default: every folder in ../shared/datasets")
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="override the per-line train cap")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("LINE", "BACKBONE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        line, backbone = args.worker
        cap = args.max_train if args.max_train is not None else MAX_TRAIN.get(line)
        print(json.dumps(run_one(line, backbone, args.sets, args.threads, cap)))
        return
    lines = args.lines or sorted(p.name for p in DATASETS.iterdir() if (p / "train").is_dir())
    rows = []
    for line in lines:
        for backbone in args.backbones:
            extra = [f"--set={s}" for s in args.sets]
            extra += ["--max-train", str(args.max_train)] if args.max_train is not None else []
            row = run_worker(__file__, [line, backbone], args.threads, extra, f"{line}/{backbone}")
            if row is None:
                continue
            rows.append(row)
            print(f"done {line}/{backbone}: {rows[-1]['fit_s']:.1f} s fit", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
