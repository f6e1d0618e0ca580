"""Human-facing outputs: heatmap overlays, outlines of flagged regions, and rows for metric tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from components.metrics import EvaluationReport, ScoredSample, pro_curve, roc_curve_points


def jet(values: np.ndarray) -> np.ndarray:
    """Colour map of values in [0, 1]. (H, W) -> uint8 (H, W, 3), blue (low) to red (high)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def normalise_map(amap: np.ndarray, pixel_threshold: float | None) -> np.ndarray:
    """Scale a map for display: with a threshold, the threshold sits mid-scale (so colours mean the same
    thing on every image); without one, per-image min-max. (H, W) -> (H, W) in [0, 1]."""
    if pixel_threshold is not None and pixel_threshold > 0:
        return amap / (2.0 * pixel_threshold)
    lo, hi = float(amap.min()), float(amap.max())
    return (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)


def outline(region: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean region (H, W) -> bool (H, W), two pixels wide."""
    return region & ~ndimage.binary_erosion(region, iterations=2)


def overlay(image: np.ndarray, amap: np.ndarray, pixel_threshold: float | None = None,
            mask: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """Heatmap blended over the image, flagged regions outlined in white, ground truth in green.

    image uint8 (H, W, 3), amap (H, W) -> uint8 (H, W, 3).
    """
    heat = jet(normalise_map(amap, pixel_threshold)).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    out = out.astype(np.uint8)
    if pixel_threshold is not None:
        out[outline(amap > pixel_threshold)] = (255, 255, 255)
    if mask is not None and mask.any():
        out[outline(mask)] = (0, 255, 0)
    return out


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


METRIC_COLUMNS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")


def metric_rows(report: EvaluationReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows (scope, n, metrics formatted to 3 decimals, '-' for undefined)."""
    header = ["scope", "images", *METRIC_COLUMNS]
    rows = []
    for row in report.table():
        cells = [str(row["scope"]), str(row.get("n_images", ""))]
        for key in METRIC_COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}")
        rows.append(cells)
    return header, rows


def _pct(value: object) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}%"


def operating_point_rows(op: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the operating point (components/operating_point.py): false-reject rate on good
    images and escape rate on defective ones, counts and Clopper-Pearson interval, overall and per type."""
    header = ["scope", "false rejects", "FRR", "FRR interval", "escapes", "escape rate", "escape interval"]
    o = op["overall"]
    rows = [["overall", f"{o['n_false_rejects']}/{o['n_good']}", _pct(o["false_reject_rate"]),
             f"{_pct(o['false_reject_rate_lower'])}-{_pct(o['false_reject_rate_upper'])}",
             f"{o['n_escapes']}/{o['n_defective']}", _pct(o["escape_rate"]),
             f"{_pct(o['escape_rate_lower'])}-{_pct(o['escape_rate_upper'])}"]]
    for name, d in op["per_defect"].items():
        rows.append([name, "", "", "", f"{d['n_escapes']}/{d['n_defective']}", _pct(d["escape_rate"]),
                     f"{_pct(d['escape_rate_lower'])}-{_pct(d['escape_rate_upper'])}"])
    return header, rows


def calibration_line(threshold) -> str | None:
    """One line when the calibration could not guarantee the requested false-reject rate (else None)."""
    if threshold is None or threshold.guaranteed is not False:
        return None
    return (f"false-reject rate {threshold.false_reject_rate:g} cannot be guaranteed with "
            f"{threshold.n_calibration} good calibration images: the threshold guarantees FRR <= "
            f"{threshold.frr_upper_bound:.3f} at {threshold.confidence:g} confidence (recorded as guaranteed: false)")


# ---------------------------------------------------------------------------------------------- curves
def image_roc(records: list[ScoredSample]) -> tuple[np.ndarray, np.ndarray]:
    """Image-level ROC of scored test records -> fpr, tpr. ValueError if they hold one class only."""
    labels = np.array([r.label for r in records])
    fpr, tpr, _ = roc_curve_points(labels, np.array([r.score for r in records], dtype=np.float64))
    return fpr, tpr


def records_pro(records: list[ScoredSample], num_thresholds: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve (pixel fpr, per-region overlap) over the good and the masked defective records. ValueError
    when there is no defect region or no normal pixel."""
    pixel = [r for r in records if r.label == 0 or r.mask is not None]
    if not pixel:
        raise ValueError("no record usable for pixel metrics")
    maps = np.stack([np.asarray(r.anomaly_map, dtype=np.float32) for r in pixel])
    masks = np.zeros(maps.shape, dtype=bool)
    for i, r in enumerate(pixel):
        if r.label == 1 and r.mask is not None:
            masks[i] = r.mask
    fpr, pro = pro_curve(masks, maps, num_thresholds=num_thresholds)
    if np.isnan(fpr).all():
        raise ValueError("no defect region or no normal pixel: the PRO curve is undefined")
    return fpr, pro


def write_curves(records: list[ScoredSample], out_dir: str | Path) -> dict[str, Path | str]:
    """`roc.csv` (fpr, tpr) and `pro.csv` (fpr, pro) in out_dir, the files `dvc plots` draws (dvc.yaml).
    Returns {name: path written, or the reason it was not}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path | str] = {}
    for name, columns, curve in (("roc.csv", ("fpr", "tpr"), image_roc), ("pro.csv", ("fpr", "pro"), records_pro)):
        try:
            x, y = curve(records)
        except ValueError as exc:
            done[name] = str(exc)
            continue
        rows = "".join(f"{a:.6g},{b:.6g}\n" for a, b in zip(x, y, strict=True))
        (out_dir / name).write_text(f"{columns[0]},{columns[1]}\n" + rows)
        done[name] = out_dir / name
    return done
