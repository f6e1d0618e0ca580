"""Dinomaly per line and as ONE unified model over every line in ../shared/datasets.

Per-line rows: one model per line (components.training.fit_line). Unified rows: one model fitted on the
union of the lines' good images (components.dinomaly.unified.fit_unified), evaluated on each line's test
split; its train seconds are the whole unified fit, repeated on each of its rows. Each fit runs in its own
child process. Prints: image AUROC, pixel AUROC, AUPRO, train seconds, inference ms/image, and the mean
over lines per mode.

    .venv/bin/python bench/dinomaly.py                                  # params.yaml's dinomaly section
    .venv/bin/python bench/dinomaly.py --modes unified --set detector.dinomaly.iterations=50

As bench/accuracy.py: all train images fitted (no calibration hold-out), pcb limited to its first 50 train
images, 2 threads. Rows whose encoder reads `cnn-variant` are the CNN adapter, NOT the paper's Dinomaly
(DINOv2 ViT encoder): never quote them as the paper's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from child import NO_CALIBRATION
from mdtable import table

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
MAX_TRAIN = {"pcb": 50}


def _config(overrides: list[str], threads: int):
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    import components.dinomaly.detector  # noqa: F401  (registers "dinomaly" even before the registry lists it)
    from components.config import load_config

    sets = ["detector.method=dinomaly", *NO_CALIBRATION, f"detector.dinomaly.threads={threads}",
            *overrides]
    return load_config(ROOT / "params.yaml", sets)


def _encoder_label(cfg) -> str:
    p = cfg.detector.dinomaly
    return f"cnn-variant:{cfg.backbone.name}" if p.is_variant else p.vit_name


def _row(line: str, mode: str, cfg, evaluation, n_train: int, train_s: float, stats: dict) -> dict:
    o = evaluation.report.overall
    return {"line": line, "mode": mode, "encoder": _encoder_label(cfg), "n_train": n_train,
            "iterations": cfg.detector.dinomaly.iterations, "image_auroc": o["image_auroc"],
            "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro"], "train_s": train_s,
            "ms_per_image": evaluation.ms_per_image, "final_loss": stats.get("final_loss"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_line(line: str, overrides: list[str], threads: int, cap: int | None) -> list[dict]:
    cfg = _config(overrides, threads)
    from components.data import scan_line
    from components.evaluation import evaluate_split
    from components.training import fit_line

    fitted = fit_line(cfg, DATASETS / line, cap)
    result = evaluate_split(fitted.detector, scan_line(DATASETS / line), cfg)
    return [_row(line, "per-line", cfg, result, fitted.n_fit, fitted.fit_seconds, fitted.detector.fit_stats_)]


def run_unified(lines: list[str], overrides: list[str], threads: int, cap: int | None) -> list[dict]:
    cfg = _config(overrides, threads)
    from components.dinomaly.unified import fit_unified
    from components.evaluation import evaluate_split

    caps = {line: cap if cap is not None else MAX_TRAIN.get(line) for line in lines}
    fitted = fit_unified(cfg, {line: DATASETS / line for line in lines}, caps)
    rows = []
    for line in lines:
        result = evaluate_split(fitted.detector, fitted.splits[line], cfg)
        rows.append(_row(line, "unified", cfg, result, sum(fitted.n_fit.values()), fitted.fit_seconds,
                         fitted.detector.fit_stats_))
    return rows


def with_means(rows: list[dict]) -> list[dict]:
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        group = [r for r in rows if r["mode"] == mode]
        out.extend(group)
        if len(group) > 1:
            mean = {k: sum(r[k] for r in group) / len(group) for k in ("image_auroc", "pixel_auroc", "aupro")
                    if all(r[k] is not None for r in group)}
            train = sum(r["train_s"] for r in group) if mode == "per-line" else group[0]["train_s"]
            out.append({"line": "mean", "mode": mode, "encoder": group[0]["encoder"], "train_s": train, **mean})
    return out


def print_table(rows: list[dict]) -> None:
    cols = [("line", "line", "s"), ("mode", "mode", "s"), ("encoder", "encoder", "s"), ("n_train", "train imgs", "d"),
            ("iterations", "iters", "d"), ("image_auroc", "img AUROC", ".3f"), ("pixel_auroc", "px AUROC", ".3f"),
            ("aupro", "AUPRO", ".3f"), ("train_s", "train s", ".0f"), ("ms_per_image", "ms/img", ".0f"),
            ("final_loss", "last loss", ".4f"), ("peak_rss_mb", "peak RSS MB", ".0f")]
    print(table(rows, cols))
    if any(str(r.get("encoder", "")).startswith("cnn-variant") for r in rows):
        print("\ncnn-variant: Dinomaly on an ImageNet CNN's stages as tokens (offline adapter), "
              "NOT the paper's DINOv2 ViT encoder.")
    print("unified: ONE model for all lines; its train s is the whole unified fit (train imgs = all lines).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", nargs="*", default=None, help="default: every folder in ../shared/datasets")
    parser.add_argument("--modes", nargs="*", default=["per-line", "unified"], choices=["per-line", "unified"])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="override the per-line train cap")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, *lines = args.worker
        if mode == "per-line":
            cap = args.max_train if args.max_train is not None else MAX_TRAIN.get(lines[0])
            rows = run_line(lines[0], args.sets, args.threads, cap)
        else:
            rows = run_unified(lines, args.sets, args.threads, args.max_train)
        print(json.dumps(rows))
        return
    lines = args.lines or sorted(p.name for p in DATASETS.iterdir() if (p / "train").is_dir())
    jobs = [("per-line", [line]) for line in lines] if "per-line" in args.modes else []
    jobs += [("unified", lines)] if "unified" in args.modes else []
    # PASSIVE: idle OpenMP threads sleep instead of spinning; on this shared 2-core machine spinning threads
    # made small decoder steps 10-20x slower (measured). Set it yourself to compare with another value.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    rows = []
    for mode, job_lines in jobs:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), *[f"--set={s}" for s in args.sets]]
        if args.max_train is not None:
            cmd += ["--max-train", str(args.max_train)]
        cmd += ["--worker", mode, *job_lines]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{mode} {job_lines} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done {mode} {' '.join(job_lines)}: {rows[-1]['train_s']:.0f} s train", file=sys.stderr, flush=True)
    rows = with_means(rows)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
