"""Fit a detector on a product line's good images and calibrate its threshold on good images it has not seen.

threshold.calibration crossfit (default): the good train images are split into k folds; k detectors, each
fitted on the other folds, score their held-out fold, so EVERY good image gets an out-of-fold score; the
deployed detector is then fitted on all of them and calibrated on those scores (components/thresholds.py,
order-statistic bound). A PatchCore-like detector (extract + fit_features) extracts its features once.
holdout: data.calibration_fraction of the images is held out, the detector fitted on the rest.

The same routine serves the CLI, the DVC stages and the Prefect flows.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components import thresholds
from components.capabilities import FeatureCached, StepTrained
from components.config import Config, DataConfig
from components.data import LineSplit, Preprocess, Sample, iter_batches, scan_line, split_calibration
from components.detector import Detector, ProgressFn, ScoreBatch, create_detector
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)


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
    """The optional keyword arguments of `detector.fit`: {"log_step": ..., "checkpoint_dir": ...} (those given)
    for a detector that trains in steps (components.capabilities.StepTrained); a detector without training
    steps, e.g. PatchCore, gets neither."""
    if not isinstance(detector, StepTrained):
        return {}
    wanted = {"log_step": log_step, "checkpoint_dir": checkpoint_dir}
    return {k: v for k, v in wanted.items() if v is not None}


def fit_and_calibration_samples(cfg: Config, train: Sequence[Sample]) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """(images the deployed detector is fitted on, images its threshold is calibrated on): crossfit -> all
    and all (scored out of fold); holdout -> split_calibration."""
    if cfg.threshold.calibration == "crossfit":
        return tuple(train), tuple(train)
    return split_calibration(train, cfg.data.calibration_fraction, cfg.data.seed)


def fold_of(samples: Sequence[Sample], folds: int, seed: int) -> np.ndarray:
    """samples (N,) -> fold index (N,) in [0, min(folds, N)): ranked by sha256(seed, type/name) like
    split_calibration (independent of input order), then dealt round-robin, so folds differ by <= 1 image."""
    n = len(samples)
    if n < 2:
        raise ValueError(f"cross-fit calibration needs at least 2 good train images, got {n}")
    k = min(folds, n)
    ranks = sorted(range(n), key=lambda i: hashlib.sha256(
        f"{seed}:{samples[i].defect_type}/{samples[i].path.name}".encode()).digest())
    out = np.empty(n, dtype=np.int64)
    for position, i in enumerate(ranks):
        out[i] = position % k
    return out


def crossfit_scores(cfg: Config, samples: Sequence[Sample], features: torch.Tensor | None = None,
                    progress: ProgressFn | None = None) -> ScoreBatch:
    """Out-of-fold scores of `samples` (N,) in order: fold j is scored by a fresh detector fitted on the
    other folds. features: the samples' patch embeddings from `extract` (N * rows, D), when the detector
    can fit from them (then no image is decoded for fitting)."""
    fold = fold_of(samples, cfg.threshold.folds, cfg.data.seed)
    n, k = len(samples), int(fold.max()) + 1
    if features is not None and features.shape[0] % n:  # not one block of rows per image: fit from images
        features = None
    per_image = features.shape[0] // n if features is not None else 0
    image_scores, maps = np.empty(n), None
    for j in range(k):
        held, rest = np.flatnonzero(fold == j), np.flatnonzero(fold != j)
        detector = create_detector(cfg)
        if features is not None:
            rows = (torch.from_numpy(rest)[:, None] * per_image + torch.arange(per_image)).reshape(-1)
            detector.fit_features(features[rows])
        else:
            detector.fit(image_stream([samples[i] for i in rest], cfg.data))
        scored = score_samples(detector, [samples[i] for i in held], cfg.data)
        image_scores[held] = scored.image_scores
        if maps is None:
            maps = np.empty((n, *scored.anomaly_maps.shape[1:]), dtype=np.float32)
        maps[held] = scored.anomaly_maps
        logger.info("cross-fit fold %d/%d: fitted on %d images, scored %d", j + 1, k, rest.size, held.size)
        if progress:
            progress("cross-fit", j + 1, k)
    return ScoreBatch(image_scores=image_scores, anomaly_maps=maps)


def fit_line(cfg: Config, root: str | Path, max_train_images: int | None = None,
             progress: ProgressFn | None = None, log_step: LogStepFn | None = None,
             checkpoint_dir: str | Path | None = None) -> FitResult:
    """Scan the line, fit the configured detector, calibrate its threshold (crossfit or holdout, above).

    log_step / checkpoint_dir go to detectors whose `fit` accepts them (see `fit_options`)."""
    split = scan_line(root, require_test=False)
    train = split.train[:max_train_images] if max_train_images else split.train
    fit_samples, cal_samples = fit_and_calibration_samples(cfg, train)
    logger.info("%s: %d images to fit, %d to calibrate", split.root, len(fit_samples), len(cal_samples))
    detector = create_detector(cfg)
    t0 = time.perf_counter()
    total = len(fit_samples)
    fit_progress = (lambda stage, done, tot: progress(stage, done, total if stage == "features" else tot)) \
        if progress else None
    features = None
    if cfg.threshold.calibration == "crossfit" and _fits_from_features(detector):
        features = detector.extract(image_stream(fit_samples, cfg.data), progress=fit_progress)
        detector.fit_features(features, progress=fit_progress)
    else:
        detector.fit(image_stream(fit_samples, cfg.data), progress=fit_progress,
                     **fit_options(detector, log_step, checkpoint_dir))
    t1 = time.perf_counter()
    calibrate_detector(detector, cal_samples, cfg, progress, features)
    return FitResult(detector, split, len(fit_samples), len(cal_samples), t1 - t0, time.perf_counter() - t1)


def _fits_from_features(detector: Detector) -> bool:
    """PatchCore-like (extract + fit_features) and not told to stream its features to disk."""
    params = getattr(detector, "params", None)
    return (isinstance(detector, FeatureCached)
            and getattr(params, "stream_features", False) is not True and not getattr(params, "tile_size", None))


def calibrate_detector(detector: Detector, samples: Sequence[Sample], cfg: Config,
                       progress: ProgressFn | None = None, features: torch.Tensor | None = None) -> None:
    """Set `detector.threshold_` (and `calibration_`: the good scores and image statistics the monitor
    compares with) from good `samples`: scored by `detector` itself (holdout: they were held out of its
    fit) or out of fold (crossfit; `features` = their embeddings when the detector fits from them).
    No samples: no threshold, warned."""
    if not samples:
        logger.warning("calibration_fraction is 0: the model has no decision threshold")
        return
    crossfit = cfg.threshold.calibration == "crossfit"
    if crossfit:
        scores = crossfit_scores(cfg, samples, features if features is not None and _fits_from_features(detector)
                                 else None, progress)
    else:
        scores = score_samples(detector, samples, cfg.data, progress)
    t = cfg.threshold
    detector.threshold_ = thresholds.calibrate(scores.image_scores, scores.anomaly_maps, t.false_reject_rate,
                                               t.confidence, t.calibration)
    detector.calibration_ = {"method": t.calibration, "image_scores": [float(v) for v in scores.image_scores],
                             "images": [s.path.name for s in samples], **image_statistics(samples, cfg.data)}


THUMBNAIL = 8  # side of the colour thumbnail that stands for an image's layout in the drift statistics


def image_statistics(samples: Sequence[Sample], data: DataConfig) -> dict[str, list[float]]:
    """Per image, after the model's preprocessing: brightness (mean of [0, 1] values), contrast (their
    standard deviation), and the distance of its thumbnail embedding (`thumbnails`) to the centroid of the
    OTHER images' (leave-one-out, so that a new good image is compared on equal terms). -> {"brightness": [N],
    "contrast": [N], "centroid": [3 * 8 * 8] (the mean embedding), "centroid_distance": [N]}"""
    brightness, contrast, embeddings = [], [], []
    for images in image_stream(samples, data):
        b, c = brightness_contrast(images)
        brightness += b
        contrast += c
        embeddings.append(thumbnails(images))
    out: dict[str, list[float]] = {"brightness": brightness, "contrast": contrast}
    if embeddings:
        e = np.concatenate(embeddings)
        n = len(e)
        centroid = e.mean(axis=0)
        others = (e.sum(axis=0)[None] - e) / max(n - 1, 1)
        out |= {"centroid": centroid.tolist(), "centroid_distance": np.linalg.norm(e - others, axis=1).tolist()}
    return out


def thumbnails(images: torch.Tensor) -> np.ndarray:
    """images (B, 3, H, W) in [0, 1] -> (B, 3 * 8 * 8) float64: each image averaged down to an 8 x 8 colour
    thumbnail. A pixel-space embedding, the same for every method (no backbone features): it moves when the
    layout of the scene moves (the part shifted or turned, another product, a blurred or covered lens) even
    where brightness and contrast stay put."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), THUMBNAIL)
    return pooled.reshape(images.shape[0], -1).double().numpy()


def centroid_distances(images: torch.Tensor, centroid: Sequence[float]) -> list[float]:
    """Distance of each image's thumbnail embedding to a reference centroid (image_statistics)."""
    return np.linalg.norm(thumbnails(images) - np.asarray(centroid, np.float64)[None], axis=1).tolist()


def brightness_contrast(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """images (B, 3, H, W) in [0, 1] -> (mean, standard deviation) of each image's values, as lists (B,)."""
    flat = images.reshape(images.shape[0], -1).double()
    return flat.mean(dim=1).tolist(), flat.std(dim=1).tolist()


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> uint8 (H, W, 3). numpy only, no torch kernel: safe to call from any thread
    of a process that keeps torch's work on one thread (flows/service/models.py says why)."""
    return (np.clip(image.detach().numpy().transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
