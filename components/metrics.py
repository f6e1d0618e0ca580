"""Anomaly-detection evaluation with the MVTec AD definitions.

Image level: AUROC, average precision (AP) and F1-max over the image scores. Pixel level: the same three
over every pixel of every anomaly map, plus AU-PRO, the area under the per-region-overlap curve up to a
false-positive rate of 0.3, normalised so that a perfect detector scores 1.0 (Bergmann et al., MVTec AD
evaluation code: ``compute_pro`` / ``trapezoid`` / ``calculate_au_pro``).

All curves come from one sort of the scores (descending) and cumulative counts over it; tied scores form
one threshold (the curve point is taken at the end of each tie group), exactly as scikit-learn's
``roc_curve`` / ``precision_recall_curve`` and the MVTec reference code do. Pixel scores are compared in
float32 (anomaly maps are float32), which keeps ~20 million pixels within a few hundred MB.

AUROC, AP and F1-max are ``nan`` (with a logged warning, never an exception) when only one class is
present, because none of them is meaningful then; AU-PRO is ``nan`` when there is no defect region or no
normal pixel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

METRIC_KEYS = ("auroc", "ap", "f1_max")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)  # as in the MVTec AD reference code
_CHUNK = 1 << 20  # curve points per chunk of float64 work


# ----------------------------------------------------------------------------------------------------------
# Core: one descending sort, counts at the end of every tie group
# ----------------------------------------------------------------------------------------------------------


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(f"{bad} of {values.size} {what} are not finite (nan or inf)")


def _count_dtype(size: int) -> type:
    return np.int32 if size < np.iinfo(np.int32).max else np.int64


def _descending(scores: np.ndarray, carried: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scores (P,), carried (P,) -> scores sorted descending (P,), last (P,) bool, carried in that order (P,).

    ``last[i]`` marks the last position of a group of tied scores: flagging every score >= ``sorted[i]``
    flags positions ``0..i``, so the curve points are the cumulative counts read where ``last`` is True.
    """
    order = np.argsort(scores)[::-1]
    ordered = scores[order]
    moved = carried[order]
    del order
    last = np.empty(ordered.size, dtype=bool)
    np.not_equal(ordered[:-1], ordered[1:], out=last[:-1])
    last[-1] = True
    return ordered, last, moved


def _binary_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (P,) bool, scores (P,) -> tps (K,), fps (K,), thresholds (K,) descending; K distinct scores."""
    ordered, last, y = _descending(scores, labels)
    tps = np.cumsum(y, dtype=_count_dtype(y.size))[last]
    np.logical_not(y, out=y)
    fps = np.cumsum(y, dtype=_count_dtype(y.size))[last]
    return tps, fps, ordered[last]


def _degenerate(n_pos: int, n_neg: int, what: str) -> bool:
    if n_pos == 0 or n_neg == 0:
        logger.warning(
            "%s: only one class present (%d positive, %d negative); auroc, ap and f1_max are nan",
            what, n_pos, n_neg,
        )
        return True
    return False


def _metrics_from_counts(tps: np.ndarray, fps: np.ndarray, what: str) -> dict[str, float]:
    """tps, fps (K,) cumulative counts at descending thresholds -> {auroc, ap, f1_max}.

    AUROC is the trapezoid area under (fpr, tpr) from (0, 0); AP the step sum of recall increments times
    precision (scikit-learn's ``average_precision_score``); F1 = 2 TP / (2 TP + FP + FN). Worked in chunks
    so that float64 temporaries stay small for ~20 million pixels.
    """
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if _degenerate(n_pos, n_neg, what):
        return dict.fromkeys(METRIC_KEYS, math.nan)
    area2 = ap_sum = f1_max = 0.0
    tp_before = fp_before = 0.0
    for start in range(0, tps.size, _CHUNK):
        tp = tps[start:start + _CHUNK].astype(np.float64)
        fp = fps[start:start + _CHUNK].astype(np.float64)
        tp_prev = np.concatenate(([tp_before], tp[:-1]))
        fp_prev = np.concatenate(([fp_before], fp[:-1]))
        area2 += float(np.sum((fp - fp_prev) * (tp + tp_prev)))
        ap_sum += float(np.sum((tp - tp_prev) * (tp / (tp + fp))))
        f1_max = max(f1_max, float(np.max(2.0 * tp / (tp + fp + n_pos))))
        tp_before, fp_before = tp[-1], fp[-1]
    return {"auroc": area2 / (2.0 * n_pos * n_neg), "ap": ap_sum / n_pos, "f1_max": f1_max}


def _labels_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"labels and scores must both be (N,), got {labels.shape} and {scores.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (good) or 1 (defective), got values {np.unique(labels)[:10]}")
    _check_finite(scores, "image scores")
    return labels.astype(bool), scores


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """labels (N,) int in {0, 1}, scores (N,) float (higher = more anomalous) -> {auroc, ap, f1_max}."""
    y, s = _labels_scores(labels, scores)
    if y.size == 0:
        _degenerate(0, 0, "image metrics")
        return dict.fromkeys(METRIC_KEYS, math.nan)
    tps, fps, _ = _binary_counts(y, s)
    return _metrics_from_counts(tps, fps, "image metrics")


def _masks_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be (N, H, W), got {masks.shape} and {maps.shape}")
    if maps.size == 0:
        raise ValueError("masks and maps are empty")
    maps = maps.astype(np.float32, copy=False)
    _check_finite(maps, "anomaly-map pixels")
    return masks.astype(bool, copy=False), maps


def pixel_metrics(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """masks (N, H, W) bool, maps (N, H, W) float -> {auroc, ap, f1_max} over all pixels (float32 scores)."""
    m, s = _masks_maps(masks, maps)
    tps, fps, _ = _binary_counts(m.ravel(), s.ravel())
    return _metrics_from_counts(tps, fps, "pixel metrics")


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (N,), scores (N,) -> fpr (K+1,), tpr (K+1,), thresholds (K+1,) descending, starting (0, 0, inf).

    Needs both classes (raises ValueError otherwise): a curve of one class cannot be drawn.
    """
    y, s = _labels_scores(labels, scores)
    tps, fps, thr = _binary_counts(y, s)
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError("a ROC curve needs both good (0) and defective (1) labels")
    return (np.concatenate(([0.0], fps / fps[-1])), np.concatenate(([0.0], tps / tps[-1])),
            np.concatenate(([np.inf], thr)))


def pr_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (N,), scores (N,) -> precision (K,), recall (K,), thresholds (K,), thresholds descending."""
    y, s = _labels_scores(labels, scores)
    tps, fps, thr = _binary_counts(y, s)
    if tps[-1] == 0:
        raise ValueError("a precision-recall curve needs at least one defective (1) label")
    return tps / (tps + fps), tps / tps[-1], thr


# ----------------------------------------------------------------------------------------------------------
# PRO curve and AU-PRO
# ----------------------------------------------------------------------------------------------------------


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """masks (N, H, W) bool -> region ids (N, H, W) int32 (0 = normal, 1..R unique over all images), R."""
    ids = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if n:
            ids[i] = np.where(labelled > 0, labelled + offset, 0)
            offset += n
    return ids, offset


def _pro_points(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> thresholds (K,) descending, fpr (K,), pro (K,): one point per distinct score; nan if undefined.

    Instead of a loop over thresholds, each pixel of region r carries 1 / |r| (0 for normal pixels): the
    cumulative sum of those weights in descending score order is the summed overlap of all regions.
    """
    m, s = _masks_maps(masks, maps)
    ids, n_regions = _region_ids(m)
    sizes = np.bincount(ids.ravel(), minlength=n_regions + 1)
    n_normal = int(sizes[0])
    if n_regions == 0 or n_normal == 0:
        logger.warning("PRO curve undefined: %d defect regions, %d normal pixels; result is nan",
                       n_regions, n_normal)
        return np.array([np.inf]), np.array([math.nan]), np.array([math.nan])
    weight_of = np.zeros(n_regions + 1, dtype=np.float64)
    weight_of[1:] = 1.0 / sizes[1:]
    ordered, last, rid = _descending(s.ravel(), ids.ravel())
    del ids
    fpr = np.minimum(np.cumsum(rid == 0, dtype=_count_dtype(rid.size))[last] / n_normal, 1.0)
    pro = np.minimum(_running_sum_at(weight_of, rid, last) / n_regions, 1.0)
    return ordered[last], fpr, pro


def _running_sum_at(weight_of: np.ndarray, ids: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Cumulative sum of weight_of[ids] (P,) read where last (P,) is True -> (K,); chunked in float64."""
    parts, carry = [], 0.0
    for start in range(0, ids.size, _CHUNK):
        running = np.cumsum(weight_of[ids[start:start + _CHUNK]]) + carry
        parts.append(running[last[start:start + _CHUNK]])
        carry = float(running[-1])
    return np.concatenate(parts)


def pro_curve(masks: np.ndarray, maps: np.ndarray,
              num_thresholds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """masks (N, H, W) bool, maps (N, H, W) float -> fpr (T,), pro (T,), both non-decreasing.

    PRO = mean over every 8-connected ground-truth region of every image of the fraction of the region
    flagged; FPR = flagged fraction of all normal pixels (of all images). ``num_thresholds=None`` gives
    the exact curve, one point per distinct score plus (0, 0) and (1, 1) (T = K + 2). An integer T >= 2
    gives (0, 0) then the curve at T - 1 thresholds evenly spaced from the highest to the lowest score
    (for plotting). Undefined (no region or no normal pixel): arrays of nan.
    """
    if num_thresholds is not None and num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
    thr, fpr, pro = _pro_points(masks, maps)
    if np.isnan(fpr[0]):
        size = 2 if num_thresholds is None else num_thresholds
        return np.full(size, math.nan), np.full(size, math.nan)
    if num_thresholds is None:
        return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))
    grid = np.linspace(thr[0], thr[-1], num_thresholds - 1)
    # number of distinct scores >= t; thr is descending, so search its negation (ascending)
    count = np.searchsorted(-thr, -grid, side="right")
    return (np.concatenate(([0.0], fpr[count - 1])), np.concatenate(([0.0], pro[count - 1])))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) for x in [0, x_max], linear interpolation at x_max (MVTec ``trapezoid``)."""
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """masks (N, H, W) bool, maps (N, H, W) float -> area under PRO(FPR) on [0, fpr_limit] / fpr_limit.

    A perfect detector gives 1.0; nan when there is no defect region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)
    if np.isnan(fpr[0]):
        return math.nan
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


# ----------------------------------------------------------------------------------------------------------
# Evaluation of a scored test set
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScoredSample:
    """One scored test image. label 0 = good; mask (H, W) bool, None for good images (= all normal)."""

    name: str
    defect_type: str
    label: int
    score: float
    anomaly_map: np.ndarray  # (H, W) float32
    mask: np.ndarray | None = None  # (H, W) bool


def _clean(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, np.integer | int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.floating | float):
        return None if math.isnan(value) else float(value)
    return value


@dataclass(frozen=True)
class EvaluationReport:
    """overall: image_/pixel_{auroc, ap, f1_max}, aupro, n_images, n_defective, n_masked;
    per_defect: the same for the good images plus one defect type. n_masked counts defective images with
    a ground-truth mask (the others are left out of the pixel metrics)."""

    overall: dict[str, float | int]
    per_defect: dict[str, dict[str, float | int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable copy; nan -> None."""
        return {"overall": _clean(self.overall), "per_defect": _clean(self.per_defect)}

    def table(self) -> list[dict[str, object]]:
        """One row per scope ("overall" first, then the defect types), each {"scope": ..., **metrics}."""
        rows: list[dict[str, object]] = [{"scope": "overall", **self.overall}]
        rows += [{"scope": name, **values} for name, values in self.per_defect.items()]
        return rows


def _check_samples(records: Sequence[ScoredSample]) -> None:
    if not records:
        raise ValueError("evaluate() got no scored samples")
    shape = np.shape(records[0].anomaly_map)
    if len(shape) != 2:
        raise ValueError(f"sample {records[0].name!r}: anomaly_map must be (H, W), got {shape}")
    for r in records:
        if r.label not in (0, 1):
            raise ValueError(f"sample {r.name!r}: label must be 0 (good) or 1 (defective), got {r.label!r}")
        if not math.isfinite(r.score):
            raise ValueError(f"sample {r.name!r}: image score is not finite ({r.score!r})")
        if np.shape(r.anomaly_map) != shape:
            raise ValueError(f"sample {r.name!r}: anomaly_map shape {np.shape(r.anomaly_map)} differs from "
                             f"{shape} of sample {records[0].name!r}; pixel metrics need one map size")
        if r.mask is not None and np.shape(r.mask) != shape:
            raise ValueError(f"sample {r.name!r}: mask shape {np.shape(r.mask)} differs from its "
                             f"anomaly_map shape {shape}")


def _scope_metrics(records: Sequence[ScoredSample], fpr_limit: float, scope: str) -> dict[str, float | int]:
    labels = np.array([r.label for r in records], dtype=np.int64)
    scores = np.array([r.score for r in records], dtype=np.float64)
    out: dict[str, float | int] = {f"image_{k}": v for k, v in image_metrics(labels, scores).items()}
    pixel = [r for r in records if r.label == 0 or r.mask is not None]
    if pixel:
        maps = np.stack([np.asarray(r.anomaly_map, dtype=np.float32) for r in pixel])
        masks = np.zeros(maps.shape, dtype=bool)
        for i, r in enumerate(pixel):
            if r.mask is not None and r.label == 1:
                masks[i] = np.asarray(r.mask, dtype=bool)
        out.update({f"pixel_{k}": v for k, v in pixel_metrics(masks, maps).items()})
        out["aupro"] = aupro(masks, maps, fpr_limit)
    else:
        logger.warning("%s: no sample usable for pixel metrics; they are nan", scope)
        out.update({f"pixel_{k}": math.nan for k in METRIC_KEYS} | {"aupro": math.nan})
    out["n_images"] = len(records)
    out["n_defective"] = int(labels.sum())
    out["n_masked"] = sum(1 for r in records if r.label == 1 and r.mask is not None)
    return out


def evaluate(records: Sequence[ScoredSample], fpr_limit: float = 0.3) -> EvaluationReport:
    """Image and pixel metrics over all records, and per defect type (good images + that type).

    Good images (label 0) count as all-normal whatever their mask; a defective image without a mask
    counts for the image metrics only. All anomaly maps must have one shape (H, W).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    records = list(records)
    _check_samples(records)
    unmasked = [r.name for r in records if r.label == 1 and r.mask is None]
    if unmasked:
        logger.warning("%d defective sample(s) have no ground-truth mask and are left out of the pixel "
                       "metrics: %s", len(unmasked), ", ".join(unmasked))
    good = [r for r in records if r.label == 0]
    defect_types = sorted({r.defect_type for r in records if r.label == 1})
    per_defect = {
        d: _scope_metrics(good + [r for r in records if r.label == 1 and r.defect_type == d], fpr_limit, d)
        for d in defect_types
    }
    return EvaluationReport(overall=_scope_metrics(records, fpr_limit, "overall"), per_defect=per_defect)
