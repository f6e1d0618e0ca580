"""One Dinomaly model for several product lines (the paper's multi-class setting).

`fit_unified` fits on the union of the lines' good images (each line holds out its own calibration images)
and calibrates one threshold per line, so the single model serves every line it was trained on:
`detector.for_line(line)` carries that line's threshold. Evaluate per line with
components.evaluation.evaluate_split(detector, result.splits[line], cfg).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from components import thresholds
from components.config import Config
from components.data import LineSplit, scan_line, split_calibration
from components.detector import ProgressFn
from components.dinomaly.detector import Dinomaly
from components.training import image_stream, score_samples
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnifiedFitResult:
    detector: Dinomaly
    splits: dict[str, LineSplit]
    n_fit: dict[str, int]
    n_calibration: dict[str, int]
    fit_seconds: float
    calibration_seconds: float


def fit_unified(cfg: Config, roots: Mapping[str, str | Path],
                max_train_images: Mapping[str, int | None] | int | None = None,
                progress: ProgressFn | None = None, log_step: LogStepFn | None = None,
                checkpoint_dir: str | Path | None = None) -> UnifiedFitResult:
    """Fit ONE Dinomaly model on the good images of every line in `roots` (line -> MVTec-layout folder).

    The top-level config is used for all lines (per-line `overrides` are not applied: one model, one
    config). max_train_images caps each line's train images (one int for all, or per line). Returns the
    detector, with `line_thresholds_` calibrated per line on that line's held-out good images.
    """
    if not roots:
        raise ValueError("fit_unified needs at least one product line")
    for line in roots:
        if line in cfg.lines and cfg.lines[line].overrides:
            logger.warning("line %s: overrides %s are not applied to the unified model", line,
                           cfg.lines[line].overrides)
    splits, fit_sets, cal_sets = {}, {}, {}
    for line, root in sorted(roots.items()):
        split = scan_line(root, require_test=False)
        cap = max_train_images.get(line) if isinstance(max_train_images, Mapping) else max_train_images
        train = split.train[:cap] if cap else split.train
        fit_sets[line], cal_sets[line] = split_calibration(train, cfg.data.calibration_fraction, cfg.data.seed)
        splits[line] = split
        logger.info("unified: %s: %d images to fit, %d to calibrate", line, len(fit_sets[line]),
                    len(cal_sets[line]))
    detector = Dinomaly(cfg)
    t0 = time.perf_counter()
    stream = itertools.chain.from_iterable(image_stream(fit_sets[line], cfg.data) for line in sorted(fit_sets))
    detector.fit(stream, progress=progress, log_step=log_step, checkpoint_dir=checkpoint_dir)
    t1 = time.perf_counter()
    for line, cal in sorted(cal_sets.items()):
        if not cal:
            logger.warning("unified: line %s has no calibration images: no threshold for it", line)
            continue
        scores = score_samples(detector, cal, cfg.data, progress)
        detector.line_thresholds_[line] = thresholds.calibrate(scores.image_scores, scores.anomaly_maps,
                                                               cfg.threshold.false_reject_rate)
    return UnifiedFitResult(detector, splits, {k: len(v) for k, v in fit_sets.items()},
                            {k: len(v) for k, v in cal_sets.items()}, t1 - t0, time.perf_counter() - t1)
