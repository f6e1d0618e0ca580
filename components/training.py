"""Fit a detector on a product line's good images and calibrate its threshold on held-out good images.

The same routine serves the CLI, the DVC stages and the Prefect flows.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components import thresholds
from components.config import Config, DataConfig
from components.data import LineSplit, Preprocess, Sample, iter_batches, scan_line, split_calibration
from components.detector import Detector, ProgressFn, ScoreBatch, create_detector

logger = logging.getLogger(__name__)

LogStepFn = Callable[[int, dict[str, float]], None]
"""log_step(step, metrics): per-step training metrics (loss, lr...) from detectors that train iteratively."""


@dataclass(frozen=True)
class FitResult:
    detector: Detector
    split: LineSplit
    n_fit: int
    n_calibration: int
    fit_seconds: float
    calibration_seconds: float


def preprocess_for(data: DataConfig) -> Preprocess:
    return Preprocess(tuple(data.image_size), data.resize, tuple(data.crop_size) if data.crop_size else None)


def image_stream(samples: Sequence[Sample], data: DataConfig) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) float batches of `samples`, decoded ahead in a small thread pool."""
    for batch in iter_batches(samples, preprocess_for(data), data.batch_size, max_pixels=data.max_image_pixels):
        yield batch.images


def score_samples(detector: Detector, samples: Sequence[Sample], data: DataConfig,
                  progress: ProgressFn | None = None) -> ScoreBatch:
    """Scores of `samples` in order (no masks)."""
    out, done = [], 0
    for images in image_stream(samples, data):
        out.append(detector.score(images))
        done += images.shape[0]
        if progress:
            progress("calibration", done, len(samples))
    return ScoreBatch.concat(out)


def fit_options(detector: Detector, log_step: LogStepFn | None = None,
                checkpoint_dir: str | Path | None = None) -> dict:
    """The optional keyword arguments of `detector.fit` that it accepts: {"log_step": ..., "checkpoint_dir":
    ...} filtered by its signature (a detector without training steps, e.g. PatchCore, gets neither)."""
    accepted = inspect.signature(detector.fit).parameters
    wanted = {"log_step": log_step, "checkpoint_dir": checkpoint_dir}
    return {k: v for k, v in wanted.items() if v is not None and k in accepted}


def fit_line(cfg: Config, root: str | Path, max_train_images: int | None = None,
             progress: ProgressFn | None = None, log_step: LogStepFn | None = None,
             checkpoint_dir: str | Path | None = None) -> FitResult:
    """Scan the line, hold out calibration images, fit the configured detector, calibrate its threshold.

    log_step / checkpoint_dir go to detectors whose `fit` accepts them (see `fit_options`)."""
    split = scan_line(root, require_test=False)
    train = split.train[:max_train_images] if max_train_images else split.train
    fit_samples, cal_samples = split_calibration(train, cfg.data.calibration_fraction, cfg.data.seed)
    logger.info("%s: %d images to fit, %d to calibrate", split.root, len(fit_samples), len(cal_samples))
    detector = create_detector(cfg)
    t0 = time.perf_counter()
    total = len(fit_samples)
    fit_progress = (lambda stage, done, tot: progress(stage, done, total if stage == "features" else tot)) \
        if progress else None
    detector.fit(image_stream(fit_samples, cfg.data), progress=fit_progress,
                 **fit_options(detector, log_step, checkpoint_dir))
    t1 = time.perf_counter()
    calibrate_detector(detector, cal_samples, cfg, progress)
    return FitResult(detector, split, len(fit_samples), len(cal_samples), t1 - t0, time.perf_counter() - t1)


def calibrate_detector(detector: Detector, samples: Sequence[Sample], cfg: Config,
                       progress: ProgressFn | None = None) -> None:
    """Set `detector.threshold_` from its scores on held-out good `samples` (none: no threshold, warned)."""
    if not samples:
        logger.warning("calibration_fraction is 0: the model has no decision threshold")
        return
    scores = score_samples(detector, samples, cfg.data, progress)
    detector.threshold_ = thresholds.calibrate(scores.image_scores, scores.anomaly_maps,
                                               cfg.threshold.false_reject_rate)


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> uint8 (H, W, 3). numpy only, no torch kernel: safe to call from any thread
    of a process that keeps torch's work on one thread (flows/service/models.py says why)."""
    return (np.clip(image.detach().numpy().transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
