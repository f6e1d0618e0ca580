"""Decision thresholds calibrated on GOOD images only.

A threshold is the (1 - frr) quantile of the good images' scores, taken with numpy's ``method="higher"``
(an observed score, never an interpolation below one), and a sample is called anomalous when its score is
strictly GREATER than the threshold. Together these guarantee that at most ``frr`` of the calibration
images are rejected: with n sorted scores the threshold is the score at index ceil((n - 1)(1 - frr)), so
at most floor((n - 1) frr) <= n frr scores lie strictly above it (ties at the threshold are accepted).
For example 100 good scores and frr 0.01 give the largest score: none of them is rejected.

The pixel threshold is the same quantile of the per-image MAXIMUM of the good anomaly maps, so the rate
of good calibration images with any flagged pixel is also at most ``frr``.

With ``confidence`` (threshold.confidence; what `fit` uses) the threshold is instead the k-th smallest
score for the smallest k whose order-statistic bound (components/operating_point.py) on the FRR of NEW good
images is <= ``frr`` at that confidence; when no k can guarantee it (too few images: 1 % at 95 % needs 299)
the threshold is the largest score, ``guaranteed`` is False and one warning line says so. Every threshold
records ``frr_upper_bound``: the bound its calibration can guarantee (None for thresholds saved before it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from components import operating_point

logger = logging.getLogger(__name__)

_FIELDS = ("image", "pixel", "false_reject_rate", "n_calibration")
_OPTIONAL = ("calibration", "confidence", "frr_upper_bound", "guaranteed")  # absent in older threshold.json


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
    calibration: "holdout" | "crossfit" | None; confidence and frr_upper_bound: the upper confidence bound
    on the FRR of new good images that the calibration guarantees; guaranteed: frr_upper_bound <= target.
    Anomalous means score > threshold."""

    image: float
    pixel: float | None
    false_reject_rate: float
    n_calibration: int
    calibration: str | None = None
    confidence: float | None = None
    frr_upper_bound: float | None = None
    guaranteed: bool | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-serialisable dict of the fields (the optional ones only when set)."""
        return {k: v for k, v in asdict(self).items() if k in _FIELDS or v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, object], source: str | None = None) -> Threshold:
        """Inverse of to_dict; checks keys and types. ``source`` (e.g. a file name) prefixes errors."""
        where = f"{source}: " if source else ""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}threshold must be a mapping, got {type(d).__name__}")
        missing = [k for k in _FIELDS if k not in d]
        unknown = sorted(str(k) for k in d if k not in _FIELDS + _OPTIONAL)
        if missing or unknown:
            raise ValueError(f"{where}threshold keys are wrong: missing {missing}, unknown {unknown}; "
                             f"expected {list(_FIELDS)} and optionally {list(_OPTIONAL)}")
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
        for key in ("confidence", "frr_upper_bound"):
            value = d.get(key)
            if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
                problems.append(f"'{key}' must be a number in [0, 1] or null, got {value!r}")
        if d.get("calibration") not in (None, "holdout", "crossfit"):
            problems.append(f"'calibration' must be holdout, crossfit or null, got {d['calibration']!r}")
        if d.get("guaranteed") not in (None, True, False):
            problems.append(f"'guaranteed' must be true, false or null, got {d['guaranteed']!r}")
        if problems:
            raise ValueError(f"{where}invalid threshold: " + "; ".join(problems))
        pixel = None if d["pixel"] is None else float(d["pixel"])
        extra = {k: d.get(k) for k in _OPTIONAL}
        for key in ("confidence", "frr_upper_bound"):
            extra[key] = None if extra[key] is None else float(extra[key])
        return cls(image=float(d["image"]), pixel=pixel, false_reject_rate=float(frr), n_calibration=n, **extra)

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
              false_reject_rate: float = 0.01, confidence: float | None = None,
              method: str | None = None) -> Threshold:
    """good_image_scores (N,), good_maps (N, H, W) or None -> Threshold. confidence None: rejects <= frr of
    these images (the empirical quantile); a confidence: the order-statistic rule of the module docstring.
    method ("holdout" | "crossfit") is recorded as `calibration`."""
    _check_frr(false_reject_rate)
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    scores = np.asarray(good_image_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"good_image_scores must be (N,), got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError("cannot calibrate a threshold on zero good images")
    _check_finite(scores, "good image scores")
    q = 1.0 - false_reject_rate
    n = scores.size
    ordered = np.sort(scores)
    if confidence is None:  # the empirical quantile; rank: how many scores are accepted (<= it)
        image = float(np.quantile(scores, q, method="higher"))
        rank = int(np.searchsorted(ordered, image, side="right"))
    else:
        rank = _guaranteed_rank(n, false_reject_rate, confidence)
        image = float(ordered[rank - 1])
    pixel = None
    if good_maps is not None:
        maps = np.asarray(good_maps)
        if maps.ndim != 3 or maps.shape[0] != scores.size:
            raise ValueError(f"good_maps must be (N, H, W) with N = {scores.size} (one per good image "
                             f"score), got shape {maps.shape}")
        if maps[0].size == 0:
            raise ValueError(f"good_maps have no pixels (shape {maps.shape})")
        _check_finite(maps, "good anomaly-map pixels")
        peaks = maps.reshape(maps.shape[0], -1).max(axis=1)
        pixel = float(np.quantile(peaks, q, method="higher") if confidence is None else np.sort(peaks)[rank - 1])
    bound_confidence = confidence if confidence is not None else 0.95
    bound = operating_point.order_statistic_bound(n, rank, bound_confidence)
    guaranteed = bound <= false_reject_rate
    if confidence is not None and not guaranteed:
        logger.warning("false-reject rate %g cannot be guaranteed with %d good calibration images (needs %d): "
                       "threshold = the largest good score, guaranteed FRR <= %.3f at %g confidence",
                       false_reject_rate, n, operating_point.min_images_for(false_reject_rate, confidence),
                       bound, confidence)
    elif confidence is None and (n - 1) * (1.0 - q) < 1.0:
        logger.warning("calibrating on %d good images: too few for a false-reject rate of %g, the "
                       "threshold is the largest good score", n, false_reject_rate)
    return Threshold(image=image, pixel=pixel, false_reject_rate=false_reject_rate, n_calibration=int(n),
                     calibration=method, confidence=bound_confidence, frr_upper_bound=bound,
                     guaranteed=guaranteed)


def _guaranteed_rank(n: int, false_reject_rate: float, confidence: float) -> int:
    """1-based rank of the threshold among n sorted scores: the smallest whose bound is <= frr (else n)."""
    k = operating_point.smallest_guaranteed_rank(n, false_reject_rate, confidence)
    return n if k is None else k
