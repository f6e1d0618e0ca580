"""Score a line's test split with a fitted detector and compute every metric, with timings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from components.config import Config
from components.data import LineSplit, iter_batches
from components.detector import Detector, ProgressFn
from components.metrics import EvaluationReport, ScoredSample, evaluate
from components.operating_point import flat_metrics, operating_point
from components.training import preprocess_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    report: EvaluationReport
    records: list[ScoredSample]
    seconds: float
    ms_per_image: float  # detector.score wall time only (decoding and one untimed warm-up call excluded)
    # at the model's own threshold (components/operating_point.py); None for a model without a threshold
    operating_point: dict | None = None

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics, per defect type prefixed, for logging; with a threshold also
        false_reject_rate / escape_rate with their _lower/_upper interval, counts, per-type escape rates and
        the calibration's guaranteed FRR bound (calibration_frr_upper_bound)."""
        flat = {k: float(v) for k, v in self.report.overall.items() if v is not None}
        flat["ms_per_image"] = self.ms_per_image
        for defect, values in self.report.per_defect.items():
            for key, value in values.items():
                if value is not None and key.startswith(("image_", "pixel_", "aupro")):
                    flat[f"{defect}.{key}"] = float(value)
        if self.operating_point is not None:
            flat |= flat_metrics(self.operating_point)
            if self.operating_point.get("calibration_frr_upper_bound") is not None:
                flat["calibration_frr_upper_bound"] = float(self.operating_point["calibration_frr_upper_bound"])
        return flat


def evaluate_split(detector: Detector, split: LineSplit, cfg: Config,
                   progress: ProgressFn | None = None) -> EvaluationResult:
    """Score every test image (masks resized with the same geometry) and evaluate. Maps are kept in RAM:
    (N, H, W) float32 at the model's input size."""
    if not split.test:
        raise ValueError(f"{split.root}: no test images to evaluate")
    data = cfg.data
    records: list[ScoredSample] = []
    score_time = 0.0
    t0 = time.perf_counter()
    for batch in iter_batches(split.test, preprocess_for(data), data.batch_size, with_masks=True,
                              max_pixels=data.max_image_pixels):
        if not records:  # one untimed call: one-off costs (a backbone graph per input size) are not latency
            detector.score(batch.images[:1])
        t = time.perf_counter()
        scores = detector.score(batch.images)
        score_time += time.perf_counter() - t
        for i, sample in enumerate(batch.samples):
            mask = batch.masks[i] if (sample.label == 1 and batch.has_mask[i]) else None
            records.append(ScoredSample(sample.name, sample.defect_type, sample.label,
                                        float(scores.image_scores[i]), scores.anomaly_maps[i], mask))
        if progress:
            progress("evaluate", len(records), len(split.test))
    report = evaluate(records, fpr_limit=cfg.evaluation.aupro_fpr_limit)
    op = records_operating_point(records, detector.threshold_)
    return EvaluationResult(report, records, time.perf_counter() - t0, 1000.0 * score_time / len(records), op)


def records_operating_point(records: list[ScoredSample], threshold) -> dict | None:
    """The operating point of scored records at `threshold` (a components.thresholds.Threshold or None),
    with what its calibration guaranteed (target, bound, guaranteed) alongside."""
    if threshold is None:
        return None
    op = operating_point(np.array([r.label for r in records]), np.array([r.score for r in records]),
                         threshold.image, [r.defect_type for r in records])
    op.update({"target_false_reject_rate": threshold.false_reject_rate,
               "calibration": threshold.calibration, "n_calibration": threshold.n_calibration,
               "calibration_frr_upper_bound": threshold.frr_upper_bound, "guaranteed": threshold.guaranteed})
    return op


def worst_misses(records: list[ScoredSample], threshold: float | None, count: int) -> list[ScoredSample]:
    """The `count` most wrong images: defective with the lowest scores and good with the highest,
    interleaved (rank by distance past the threshold, or past the median score without one)."""
    if not records or count <= 0:
        return []
    scores = np.array([r.score for r in records])
    pivot = threshold if threshold is not None else float(np.median(scores))
    wrongness = [(pivot - r.score) if r.label == 1 else (r.score - pivot) for r in records]
    order = np.argsort(wrongness)[::-1]
    return [records[i] for i in order[:count]]
