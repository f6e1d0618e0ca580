"""Human-facing outputs: heatmap overlays, outlines of flagged regions, and rows for metric tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from components.metrics import EvaluationReport


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
