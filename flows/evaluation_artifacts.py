"""Evaluation artifacts written to a folder (flows.tracking.log_evaluation logs the folder to MLflow):

    out_dir/metrics.json           report (overall + per defect type), timings, threshold, operating point
    out_dir/scores.csv             one row per test image: defect_type, name, label, score
    out_dir/roc_curve.png          image-level ROC, overall and per defect type
    out_dir/pro_curve.png          per-region-overlap curve with the AU-PRO integration limit
    out_dir/worst_misses/NN_*.png  heatmap overlays of the most wrong images (components.report.overlay)

Plots use matplotlib's Agg canvas directly (no pyplot global state, safe in worker threads). A curve that
cannot be drawn (one class only, no defect region) is left out and noted in metrics.json.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from components.config import DataConfig
from components.data import LineSplit, load_image
from components.evaluation import EvaluationResult, worst_misses
from components.metrics import ScoredSample, roc_curve_points
from components.report import image_roc, overlay, records_pro, save_png
from components.thresholds import Threshold
from components.training import preprocess_for, to_uint8_image

logger = logging.getLogger(__name__)

ImageFor = Callable[[ScoredSample], "np.ndarray | None"]
"""image_for(record) -> uint8 (H, W, 3) at the anomaly map's size, or None when unknown."""
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def write_evaluation(result: EvaluationResult, threshold: Threshold | None, out_dir: Path, worst: int, *,
                     split: LineSplit | None = None, data: DataConfig | None = None,
                     fpr_limit: float = 0.3) -> list[Path]:
    """Write every artifact listed in the module docstring to `out_dir`; return the paths written.

    split + data (the evaluated split and its DataConfig) let the overlays show the test images; without
    them the heatmaps are drawn over a grey background.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = result.records
    notes: list[str] = []
    written = [_write_scores(records, out_dir / "scores.csv")]
    for path, draw in ((out_dir / "roc_curve.png", lambda p: roc_figure(records, p)),
                       (out_dir / "pro_curve.png", lambda p: pro_figure(records, p, fpr_limit))):
        try:
            written.append(draw(path))
        except ValueError as exc:
            notes.append(f"{path.name} not drawn: {exc}")
            logger.warning("%s not drawn: %s", path.name, exc)
    image_for = image_loader(split, data) if split is not None and data is not None else None
    written += worst_miss_overlays(records, threshold, worst, out_dir / "worst_misses", image_for)
    payload = {"report": result.report.to_dict(), "ms_per_image": result.ms_per_image,
               "seconds": result.seconds, "n_images": len(records), "aupro_fpr_limit": fpr_limit,
               "threshold": threshold.to_dict() if threshold is not None else None, "notes": notes,
               "operating_point": result.operating_point}
    (out_dir / "metrics.json").write_text(json.dumps(_finite(payload), indent=2, sort_keys=True))
    return [out_dir / "metrics.json", *written]


def _write_scores(records: list[ScoredSample], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["defect_type", "name", "label", "score"])
        for r in records:
            writer.writerow([r.defect_type, r.name, r.label, f"{r.score:.6g}"])
    return path


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def roc_figure(records: list[ScoredSample], path: Path) -> Path:
    """Image-level ROC over all records and per defect type (good images + that type). ValueError if the
    records hold only one class."""
    labels = np.array([r.label for r in records])
    scores = np.array([r.score for r in records], dtype=np.float64)
    fpr, tpr = image_roc(records)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="black", lw=2, label=f"overall (AUROC {np.trapezoid(tpr, fpr):.3f})")
    for defect in sorted({r.defect_type for r in records if r.label == 1}):
        keep = (labels == 0) | np.array([r.defect_type == defect for r in records])
        f, t, _ = roc_curve_points(labels[keep], scores[keep])
        ax.plot(f, t, lw=1, label=f"{defect} ({np.trapezoid(t, f):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false positive rate (good images flagged)", ylabel="true positive rate",
           title="image-level ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def pro_figure(records: list[ScoredSample], path: Path, fpr_limit: float) -> Path:
    """PRO against pixel FPR for the good and the masked defective records. ValueError when there is no
    defect region or no normal pixel."""
    fpr, pro = records_pro(records)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot(fpr, pro, color="black", lw=2)
    ax.axvline(fpr_limit, ls="--", color="tab:red", label=f"AU-PRO limit (FPR {fpr_limit:g})")
    ax.set(xlabel="pixel false positive rate", ylabel="per-region overlap", title="PRO curve",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def image_loader(split: LineSplit, data: DataConfig) -> ImageFor:
    """image_for(record): the record's test image, preprocessed with `data` as for scoring."""
    by_key = {(s.defect_type, s.name): s.path for s in split.test}
    preprocess = preprocess_for(data)

    def image_for(record: ScoredSample) -> np.ndarray | None:
        path = by_key.get((record.defect_type, record.name))
        if path is None:
            return None
        return to_uint8_image(preprocess.image(load_image(path, data.max_image_pixels)))

    return image_for


def worst_miss_overlays(records: list[ScoredSample], threshold: Threshold | None, count: int, out_dir: Path,
                        image_for: ImageFor | None = None) -> list[Path]:
    """Overlays of the `count` most wrong records (components.evaluation.worst_misses), ranked 01, 02..."""
    misses = worst_misses(records, threshold.image if threshold is not None else None, count)
    pixel_threshold = threshold.pixel if threshold is not None else None
    written = []
    for rank, r in enumerate(misses, start=1):
        amap = np.asarray(r.anomaly_map, dtype=np.float32)
        image = image_for(r) if image_for is not None else None
        if image is None or image.shape[:2] != amap.shape:
            image = np.full((*amap.shape, 3), 128, dtype=np.uint8)
        mask = np.asarray(r.mask, dtype=bool) if r.mask is not None else None
        name = _SAFE.sub("_", f"{rank:02d}_{r.defect_type}_{r.name}_score{r.score:.4g}") + ".png"
        written.append(save_png(overlay(image, amap, pixel_threshold, mask), out_dir / name))
    return written


def _finite(value):
    """nan/inf -> None, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
