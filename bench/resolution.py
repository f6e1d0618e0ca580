"""PatchCore at a line's size and resolution: fit cost against feature extraction alone, inference cost
against the backbone's forward, and accuracy, per configuration.

    .venv/bin/python bench/resolution.py                                    # pcb, all 200 train images
    .venv/bin/python bench/resolution.py --line cookie --configs "data.resize=resize" "data.resize=aspect"
    .venv/bin/python bench/resolution.py --configs "data.resize=none" "data.resize=none;detector.patchcore.index=flat"

A configuration is `;`-separated params overrides. Default configurations: pcb at 256 px and 512 px
(resized) and at its native 640 px (`data.resize=none`). Each runs in its own child process (peak RSS is
that run's alone), all train images fitted (no calibration hold-out, as anomalib), 2 threads:

- extract s: the patch embeddings of every train image, alone (decoding included, as in a fit);
- fit s: `fit_line` (decoding, embeddings, coreset, index with its recall check), then its coreset and
  index shares and fit / extract (the issue-13 goal: at most 10x);
- inference: ms per image of `PatchCore.score` on decoded tensors at batch 1 and 32, against the frozen
  backbone forward alone (fwd) and the frozen network forward inference runs (net: backbone + patch
  pooling as one graph), child.interleaved; the goal: at most 1.5x;
- image AUROC, pixel AUROC, AUPRO on the whole test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from child import NO_CALIBRATION, interleaved, peak_rss_mb, run_worker
from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CONFIGS = ("data.resize=resize;data.image_size=[256, 256]", "data.resize=resize;data.image_size=[512, 512]",
           "data.resize=none")


def run_one(line: str, overrides: list[str], threads: int, max_train: int | None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from components.config import load_config
    from components.data import iter_batches, scan_line
    from components.detector import create_detector
    from components.evaluation import evaluate_split
    from components.training import fit_line, image_stream, preprocess_for

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "params.yaml", [*NO_CALIBRATION, "data.batch_size=8",
                                              f"detector.patchcore.threads={threads}", *overrides])
    split = scan_line(DATASETS / line)
    train = split.train[:max_train] if max_train else split.train
    probe = create_detector(cfg)
    t = time.perf_counter()
    n_patches = len(probe.extract(image_stream(train, cfg.data)))
    extract_s = time.perf_counter() - t
    del probe
    t = time.perf_counter()
    det = fit_line(cfg, DATASETS / line, max_train).detector
    fit_s = time.perf_counter() - t
    o = evaluate_split(det, split, cfg).report.overall
    images = [b.images for b in iter_batches(split.test[:32], preprocess_for(cfg.data), 1)]
    fwd1, net1, score1 = interleaved(det, images[0], 9)
    fwd32, net32, score32 = interleaved(det, torch.cat(images), 3)
    s = det.fit_stats_
    return {"line": line, "config": "; ".join(overrides), "size": "x".join(map(str, images[0].shape[-2:])),
            "grid": "x".join(map(str, det.grid_)), "n_train": len(train), "n_patches": n_patches,
            "bank": len(det.memory_bank_), "index": f"{det.index_report_.kind}:{det.index_report_.breadth}",
            "recall": det.index_report_.recall, "extract_s": extract_s, "fit_s": fit_s, "fit_x": fit_s / extract_s,
            "coreset_s": s.get("coreset_s"), "index_s": s.get("index_s"),
            "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro"],
            "fwd_b1": 1000 * fwd1, "net_b1": 1000 * net1, "ms_b1": 1000 * score1, "x_b1": score1 / fwd1,
            "xn_b1": score1 / net1, "fwd_b32": 1000 * fwd32 / 32, "net_b32": 1000 * net32 / 32,
            "ms_b32": 1000 * score32 / 32, "x_b32": score32 / fwd32, "xn_b32": score32 / net32,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line", default="pcb")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="train images (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("LINE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        line, config = args.worker
        print(json.dumps(run_one(line, [c for c in config.split(";") if c], args.threads, args.max_train)))
        return
    rows = []
    for config in args.configs:
        row = run_worker(__file__, [args.line, config], args.threads,
                         ["--max-train", str(args.max_train)] if args.max_train else [], config)
        if row is None:
            continue
        rows.append(row)
        print(f"done {config}: {rows[-1]}", file=sys.stderr, flush=True)
    cols = [("config", "configuration", "s"), ("size", "input", "s"), ("grid", "grid", "s"),
            ("n_patches", "patches", ","), ("bank", "bank", ","), ("index", "index", "s"), ("recall", "recall", ".3f"),
            ("extract_s", "extract s", ".1f"), ("fit_s", "fit s", ".1f"), ("fit_x", "fit / extract", ".2f"),
            ("coreset_s", "coreset s", ".1f"), ("index_s", "index s", ".1f"),
            ("image_auroc", "img AUROC", ".3f"), ("pixel_auroc", "px AUROC", ".3f"), ("aupro", "AUPRO", ".3f"),
            ("fwd_b1", "fwd b1 ms", ".1f"), ("net_b1", "net b1 ms", ".1f"), ("ms_b1", "infer b1 ms", ".1f"),
            ("x_b1", "infer / fwd b1", ".2f"), ("xn_b1", "infer / net b1", ".2f"), ("fwd_b32", "fwd b32 ms", ".1f"),
            ("net_b32", "net b32 ms", ".1f"), ("ms_b32", "infer b32 ms", ".1f"), ("x_b32", "infer / fwd b32", ".2f"),
            ("xn_b32", "infer / net b32", ".2f"),
            ("peak_rss_mb", "peak RSS MB", ".0f")]
    print(f"{args.line}: {rows[0]['n_train'] if rows else '?'} train images, {args.threads} threads")
    print(table(rows, cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
