"""Transformaly in the paper's one-class semantic setting, on scikit-learn's bundled digits (offline).

For each digit d: fit on the train split's images of d (good), score the whole test split, where every other
digit is an anomaly; print image AUROC per class (agnostic NLL only, fine-tuned NLL only, and their sum =
Transformaly's score) with the fit time, and the mean over the ten classes. The 8 x 8 digits (0..16) are
upsampled bilinearly to --size px, as 3 equal channels in [0, 1]. The detector is built from params.yaml
through the public API (create_detector), so this measures the same code as the pipeline.

    .venv/bin/python bench/digits_oneclass.py                         # CNN variant from params.yaml, 64 px
    .venv/bin/python bench/digits_oneclass.py --classes 0 1 --max-train 30 --set detector.transformaly.epochs=2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mdtable import markdown

ROOT = Path(__file__).resolve().parents[1]
# idle OpenMP threads sleep instead of spinning: on this shared 2-core machine, spinning made scoring 10x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def digits_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (N, 8, 8) in [0, 1], train labels, test images, test labels): stratified, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=test_fraction,
                                                        stratify=digits.target, random_state=seed)
    return x_train, y_train, x_test, y_test


def to_images(x: np.ndarray, size: int):
    """(N, 8, 8) in [0, 1] -> torch (N, 3, size, size) float32 (bilinear upsampling, clipped to [0, 1])."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x).unsqueeze(1)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return t.expand(-1, 3, -1, -1).contiguous()


def run_class(digit: int, split, cfg, size: int, max_train: int | None) -> dict:
    """Fit on `digit`'s train images, score the whole test split; AUROCs with anomaly = any other digit."""
    from sklearn.metrics import roc_auc_score

    from components.detector import create_detector

    x_train, y_train, x_test, y_test = split
    normal = x_train[y_train == digit][:max_train]
    det = create_detector(cfg)
    t0 = time.perf_counter()
    det.fit(to_images(normal, size))
    fit_s = time.perf_counter() - t0
    images = to_images(x_test, size)
    parts = [det.score_parts(images[i:i + 256]) for i in range(0, len(images), 256)]
    agnostic = np.concatenate([p[0] for p in parts])
    finetuned = np.concatenate([p[1] for p in parts])
    scores = (agnostic + finetuned).astype(np.float32)  # what det.score returns (it sums score_parts)
    labels = (y_test != digit).astype(int)
    return {"digit": digit, "n_train": len(normal), "n_test": len(labels), "n_anomalous": int(labels.sum()),
            "auroc_agnostic": roc_auc_score(labels, agnostic), "auroc_finetuned": roc_auc_score(labels, finetuned),
            "auroc": roc_auc_score(labels, scores), "fit_s": fit_s, "label": det.label,
            "pca_components": det.fit_stats_.get("pca_components")}


def print_table(rows: list[dict]) -> None:
    head = ["digit", "train", "test (anomalous)", "AUROC agnostic", "AUROC fine-tuned", "AUROC transformaly",
            "fit s"]
    cells = [head] + [[str(r["digit"]), str(r["n_train"]), f"{r['n_test']} ({r['n_anomalous']})",
                       f"{r['auroc_agnostic']:.3f}", f"{r['auroc_finetuned']:.3f}", f"{r['auroc']:.3f}",
                       f"{r['fit_s']:.1f}"] for r in rows]
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    cells.append(["mean", "", "", f"{mean('auroc_agnostic'):.3f}", f"{mean('auroc_finetuned'):.3f}",
                  f"{mean('auroc'):.3f}", f"{sum(r['fit_s'] for r in rows):.1f} (total)"])
    print(markdown(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="*", type=int, default=list(range(10)))
    parser.add_argument("--size", type=int, default=64, help="upsampled image side in px")
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="train/test split seed")
    parser.add_argument("--max-train", type=int, default=None, help="cap on train images per class")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="params override key=value")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    import components  # noqa: F401  (torchvision shim before timm)
    from components.config import load_config

    torch.set_num_threads(args.threads)
    sets = ["detector.method=transformaly", f"detector.transformaly.threads={args.threads}",
            f"data.image_size=[{args.size}, {args.size}]", *args.sets]
    cfg = load_config(ROOT / "params.yaml", sets)
    split = digits_split(args.test_fraction, args.seed)
    rows = []
    for digit in args.classes:
        rows.append(run_class(digit, split, cfg, args.size, args.max_train))
        print(f"digit {digit}: AUROC {rows[-1]['auroc']:.3f}, fit {rows[-1]['fit_s']:.1f} s", file=sys.stderr,
              flush=True)
    print(f"{rows[0]['label']}, {args.size} px, overrides {args.sets or 'none'}")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
