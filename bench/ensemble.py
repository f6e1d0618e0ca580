"""Does a PatchCore backbone ensemble help? Each packaged backbone alone, then ensembles of them.

Each (line, configuration) runs in its own child process (peak RSS is that run's alone). Prints a table:
image AUROC, pixel AUROC, AUPRO, fit seconds (for ensembles: of which the members' scale measurement, i.e.
one extra feature extraction per member, plus the one-off backbone build that the member's fit then reuses),
inference ms/image at batch 1, bank size, the members' scales, peak RSS. Wall-clock times are what to quote
on a quiet machine; the CPU columns (process time, all threads) help to spot runs perturbed by other work.
On a shared machine set OMP_WAIT_POLICY=PASSIVE: with OpenMP's default spinning, contention once made
batch-1 latency 30 to 100 times slower (CPU time equal to wall time: threads spinning at barriers).

    .venv/bin/python bench/ensemble.py
    .venv/bin/python bench/ensemble.py --lines cookie --configs mobilenetv2_100 mobilenetv2_100+tf_efficientnet_lite0
    .venv/bin/python bench/ensemble.py --set detector.patchcore_ensemble.combine=max

A configuration is one timm name (method patchcore) or names joined by "+" (method patchcore_ensemble with
those backbones). Defaults as bench/accuracy.py: 256 px, 2 threads, params.yaml's patchcore settings, all
train images fitted (no calibration hold-out), pcb limited to its first 50 train images.
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
CONFIGS = (*BACKBONES, "mobilenetv2_100+tf_efficientnet_lite2", "+".join(BACKBONES))
LINES = ("cookie", "pcb")
MAX_TRAIN = {"pcb": 50}
LATENCY_IMAGES = 20


def settings(spec: str, threads: int, overrides: list[str]) -> list[str]:
    """--set overrides for one configuration: single backbone or "+"-joined ensemble; the caller's last."""
    names = spec.split("+")
    sets = [f"backbone.name={names[0]}", "data.image_size=[256, 256]", *NO_CALIBRATION,
            f"detector.patchcore.threads={threads}"]
    if len(names) > 1:
        sets += ["detector.method=patchcore_ensemble", f"detector.patchcore_ensemble.backbones=[{', '.join(names)}]"]
    else:
        sets.append("detector.method=patchcore")
    return sets + overrides


def run_one(line: str, spec: str, overrides: list[str], threads: int, max_train: int | None) -> dict:
    """Fit and evaluate in this process; returns the row."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from components.config import load_config
    from components.data import iter_batches, scan_line
    from components.evaluation import evaluate_split
    from components.training import fit_line, preprocess_for

    cfg = load_config(ROOT / "params.yaml", settings(spec, threads, overrides))
    t0, c0 = time.perf_counter(), time.process_time()
    fitted = fit_line(cfg, DATASETS / line, max_train)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    det = fitted.detector
    result = evaluate_split(det, scan_line(DATASETS / line), cfg)
    # batch-1 latency on decoded tensors: the model's cost, not PNG decoding
    images = [b.images for b in iter_batches(fitted.split.test[:LATENCY_IMAGES], preprocess_for(cfg.data), 1)]
    det.score(images[0])
    t, c = time.perf_counter(), time.process_time()
    for x in images:
        det.score(x)
    ms_b1 = 1000 * (time.perf_counter() - t) / len(images)
    cpu_ms_b1 = 1000 * (time.process_time() - c) / len(images)
    stats = getattr(det, "fit_stats_", {})
    scale_s = sum(v for k, v in stats.items() if k.endswith(".scale_s")) if "+" in spec else None
    scales = "/".join(f"{v:.3g}" for k, v in stats.items() if k.endswith(".scale")) or None
    o = result.report.overall
    return {"line": line, "config": spec.replace("tf_efficientnet_", "effnet_"), "method": cfg.detector.method,
            "n_train": fitted.n_fit, "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"],
            "aupro": o["aupro"], "fit_s": fit_s, "fit_cpu_s": fit_cpu_s, "scale_s": scale_s, "ms_b1": ms_b1,
            "cpu_ms_b1": cpu_ms_b1,
            "bank_size": stats.get("bank_size"), "scales": scales,
            "peak_rss_mb": peak_rss_mb()}


def print_table(rows: list[dict]) -> None:
    cols = [("line", "line", "s"), ("config", "backbones", "s"), ("n_train", "train", "d"),
            ("image_auroc", "img AUROC", ".3f"), ("pixel_auroc", "px AUROC", ".3f"), ("aupro", "AUPRO", ".3f"),
            ("fit_s", "fit s", ".1f"), ("scale_s", "of which scale s", ".1f"), ("fit_cpu_s", "fit CPU s", ".1f"),
            ("ms_b1", "ms/img b1", ".1f"), ("cpu_ms_b1", "CPU ms/img b1", ".1f"),
            ("bank_size", "bank", ".0f"), ("scales", "member scales", "s"), ("peak_rss_mb", "peak RSS MB", ".0f")]
    print(table(rows, cols))


def run_children(args: argparse.Namespace) -> list[dict]:
    rows = []
    for line in args.lines:
        for spec in args.configs:
            extra = [f"--set={s}" for s in args.sets]
            extra += ["--max-train", str(args.max_train)] if args.max_train is not None else []
            row = run_worker(__file__, [line, spec], args.threads, extra, f"{line}/{spec}")
            if row is None:
                continue
            rows.append(row)
            print(f"done {line}/{spec}: {rows[-1]['fit_s']:.1f} s fit", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", nargs="*", default=list(LINES))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="timm names, ensembles joined by +")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="override the per-line train cap")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("LINE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        line, spec = args.worker
        cap = args.max_train if args.max_train is not None else MAX_TRAIN.get(line)
        print(json.dumps(run_one(line, spec, args.sets, args.threads, cap)))
        return
    rows = run_children(args)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
