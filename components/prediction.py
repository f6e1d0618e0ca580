"""Score image files with a fitted detector and write what a person reads: one heatmap overlay per image,
predictions.csv and predictions.json (score and decision per image). Used by `defectops predict` and by
the inference flow."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from components.data import Sample, iter_batches
from components.detector import Detector, ProgressFn
from components.report import overlay, save_png
from components.training import preprocess_for, to_uint8_image

DEFECTIVE, GOOD, UNDECIDED = "defective", "good", "n/a"
FIELDS = ("image", "score", "decision", "overlay")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def unique_names(files: list[Path]) -> list[str]:
    """Object-key-safe stems ([A-Za-z0-9._-]), made unique with -1, -2... suffixes; a suffixed name never
    takes one that another file already has (`a/x`, `b/x`, `x-1` -> x, x-1, x-1-1)."""
    taken: set[str] = set()
    names = []
    for f in files:
        stem = _UNSAFE.sub("_", f.stem).strip("._") or "image"
        name, n = stem, 0
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        names.append(name)
    return names


def write_predictions(detector: Detector, files: list[Path], out: Path, overlay_dir: str = "",
                      progress: ProgressFn | None = None) -> list[dict]:
    """Score `files` in order; write `<out>/<overlay_dir>/<name>_overlay.png` per image, then
    `<out>/predictions.csv` and `<out>/predictions.json`. Returns the rows (image, score, decision, overlay).

    decision: "defective" / "good" against the detector's calibrated threshold, "n/a" without one."""
    data, threshold = detector.cfg.data, detector.threshold_
    pixel_threshold = threshold.pixel if threshold is not None else None
    names = unique_names(files)
    rows: list[dict] = []
    samples = [Sample(p, "unknown", -1, None) for p in files]
    for batch in iter_batches(samples, preprocess_for(data), data.batch_size, max_pixels=data.max_image_pixels):
        scores = detector.score(batch.images)
        for i, sample in enumerate(batch.samples):
            score = float(scores.image_scores[i])
            decision = UNDECIDED if threshold is None else (DEFECTIVE if score > threshold.image else GOOD)
            rel = str(Path(overlay_dir) / f"{names[len(rows)]}_overlay.png")
            save_png(overlay(to_uint8_image(batch.images[i]), scores.anomaly_maps[i], pixel_threshold), out / rel)
            rows.append({"image": str(sample.path), "score": score, "decision": decision, "overlay": rel})
        if progress:
            progress("predict", len(rows), len(samples))
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(rows)
    payload = {"threshold": threshold.to_dict() if threshold is not None else None, "predictions": rows}
    (out / "predictions.json").write_text(json.dumps(payload, indent=2))
    return rows
