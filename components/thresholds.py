"""Decision thresholds calibrated on GOOD images only.

A threshold is the (1 - frr) quantile of the good images' scores, taken with numpy's ``method="higher"``
(an observed score, never an interpolation below one), and a sample is called anomalous when its score is
strictly GREATER than the threshold. Together these guarantee that at most ``frr`` of the calibration
images are rejected: with n sorted scores the threshold is the score at index ceil((n - 1)(1 - frr)), so
at most floor((n - 1) frr) <= n frr scores lie strictly above it (ties at the threshold are accepted).
For example 100 good scores and frr 0.01 give the largest score: none of them is rejected.

The pixel threshold is the same quantile of the per-image MAXIMUM of the good anomaly maps, so the rate
of good calibration images with any flagged pixel is also at most ``frr``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

_FIELDS = ("image", "pixel", "false_reject_rate", "n_calibration")


def _check_frr(false_reject_rate: float) -> None:
    if not 0.0 < false_reject_rate <= 0.5:
        raise ValueError(f"false_reject_rate must be in (0, 0.5], got {false_reject_rate!r}")


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(f"{bad} of {values.size} {what} are not finite (nan or inf)")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Threshold:
    """image: image-score threshold; pixel: anomaly-map threshold (None if not calibrated);
    false_reject_rate: the target rate on good images; n_calibration: how many good images set it.
    Anomalous means score > threshold."""

    image: float
    pixel: float | None
    false_reject_rate: float
    n_calibration: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-serialisable dict of the four fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object], source: str | None = None) -> Threshold:
        """Inverse of to_dict; checks keys and types. ``source`` (e.g. a file name) prefixes errors."""
        where = f"{source}: " if source else ""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}threshold must be a mapping, got {type(d).__name__}")
        missing = [k for k in _FIELDS if k not in d]
        unknown = sorted(str(k) for k in d if k not in _FIELDS)
        if missing or unknown:
            raise ValueError(f"{where}threshold keys are wrong: missing {missing}, unknown {unknown}; "
                             f"expected exactly {list(_FIELDS)}")
        problems = []
        if not (_is_number(d["image"]) and math.isfinite(d["image"])):
            problems.append(f"'image' must be a finite number, got {d['image']!r}")
        if d["pixel"] is not None and not (_is_number(d["pixel"]) and math.isfinite(d["pixel"])):
            problems.append(f"'pixel' must be a finite number or null, got {d['pixel']!r}")
        frr = d["false_reject_rate"]
        if not (_is_number(frr) and 0.0 < frr <= 0.5):
            problems.append(f"'false_reject_rate' must be a number in (0, 0.5], got {frr!r}")
        n = d["n_calibration"]
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            problems.append(f"'n_calibration' must be an integer >= 1, got {n!r}")
        if problems:
            raise ValueError(f"{where}invalid threshold: " + "; ".join(problems))
        pixel = None if d["pixel"] is None else float(d["pixel"])
        return cls(image=float(d["image"]), pixel=pixel, false_reject_rate=float(frr), n_calibration=n)

    def decide_image(self, scores: np.ndarray) -> np.ndarray:
        """scores (N,) -> anomalous (N,) bool = score > image threshold. nan scores raise ValueError."""
        scores = np.asarray(scores, dtype=np.float64)
        if np.isnan(scores).any():
            raise ValueError(f"{int(np.isnan(scores).sum())} of {scores.size} image scores are nan")
        return scores > self.image

    def decide_pixels(self, maps: np.ndarray) -> np.ndarray:
        """maps (N, H, W) or (H, W) -> anomalous pixels, same shape, bool = value > pixel threshold."""
        if self.pixel is None:
            raise ValueError("this threshold has no pixel threshold (it was calibrated without maps)")
        maps = np.asarray(maps)
        if np.isnan(maps).any():
            raise ValueError(f"{int(np.isnan(maps).sum())} of {maps.size} anomaly-map pixels are nan")
        return maps > self.pixel


def calibrate(good_image_scores: np.ndarray, good_maps: np.ndarray | None = None,
              false_reject_rate: float = 0.01) -> Threshold:
    """good_image_scores (N,), good_maps (N, H, W) or None -> Threshold rejecting <= frr of these images."""
    _check_frr(false_reject_rate)
    scores = np.asarray(good_image_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"good_image_scores must be (N,), got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError("cannot calibrate a threshold on zero good images")
    _check_finite(scores, "good image scores")
    q = 1.0 - false_reject_rate
    image = float(np.quantile(scores, q, method="higher"))
    pixel = None
    if good_maps is not None:
        maps = np.asarray(good_maps)
        if maps.ndim != 3 or maps.shape[0] != scores.size:
            raise ValueError(f"good_maps must be (N, H, W) with N = {scores.size} (one per good image "
                             f"score), got shape {maps.shape}")
        if maps[0].size == 0:
            raise ValueError(f"good_maps have no pixels (shape {maps.shape})")
        _check_finite(maps, "good anomaly-map pixels")
        pixel = float(np.quantile(maps.reshape(maps.shape[0], -1).max(axis=1), q, method="higher"))
    if (scores.size - 1) * false_reject_rate < 1.0:
        logger.warning("calibrating on %d good images: too few for a false-reject rate of %g, the "
                       "threshold is the largest good score", scores.size, false_reject_rate)
    return Threshold(image=image, pixel=pixel, false_reject_rate=false_reject_rate,
                     n_calibration=int(scores.size))
