"""The operating point: what a model's decisions cost at the threshold it actually uses.

False-reject rate (FRR): the fraction of GOOD images called anomalous (score > threshold). Escape rate: the
fraction of DEFECTIVE images called good (score <= threshold), i.e. missed defects. Both come with an exact
two-sided Clopper-Pearson interval (test sets are small: 14 good cookie images give FRR 0/14 in [0, 23 %]).

    op = operating_point(labels (N,), scores (N,), threshold, defect_types (N,))
    op["overall"]["false_reject_rate"], op["overall"]["false_reject_rate_upper"], op["per_defect"]["cracked"]

`order_statistic_bound(n, k, confidence)` is the calibration side: the upper confidence bound on the FRR of
a threshold set at the k-th smallest of n exchangeable good scores (see components/thresholds.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion -> (low, high); (nan, nan) for zero trials."""
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if trials == 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def rate(successes: int, trials: int, name: str, confidence: float = 0.95) -> dict[str, float | int]:
    """{name, name_lower, name_upper, n_<name>_events?}: the point estimate and its Clopper-Pearson interval."""
    low, high = clopper_pearson(successes, trials, confidence)
    return {name: successes / trials if trials else math.nan, f"{name}_lower": low, f"{name}_upper": high}


def _scope(labels: np.ndarray, rejected: np.ndarray, confidence: float) -> dict[str, float | int]:
    good, bad = labels == 0, labels == 1
    n_good, n_bad = int(good.sum()), int(bad.sum())
    n_rejected_good, n_escaped = int(rejected[good].sum()), int((~rejected[bad]).sum())
    return {**rate(n_rejected_good, n_good, "false_reject_rate", confidence),
            **rate(n_escaped, n_bad, "escape_rate", confidence),
            "n_good": n_good, "n_false_rejects": n_rejected_good, "n_defective": n_bad, "n_escapes": n_escaped}


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float,
                    defect_types: Sequence[str] | None = None, confidence: float = 0.95) -> dict:
    """labels (N,) 0 good / 1 defective, scores (N,), threshold (reject when score > threshold),
    defect_types (N,) -> {"threshold", "confidence", "overall": {...}, "per_defect": {type: {...}}}.

    Per defect type only the escape rate differs (the good images are shared), so each type's entry holds
    its escape rate, interval and counts."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be one (N,) shape")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    rejected = scores > threshold
    out = {"threshold": float(threshold), "confidence": confidence,
           "overall": _scope(labels, rejected, confidence), "per_defect": {}}
    if defect_types is not None:
        types = np.asarray(list(defect_types), dtype=object)
        for d in sorted({t for t, y in zip(types, labels, strict=True) if y == 1}):
            sel = (labels == 1) & (types == d)
            n, escaped = int(sel.sum()), int((~rejected[sel]).sum())
            out["per_defect"][d] = {**rate(escaped, n, "escape_rate", confidence),
                                    "n_defective": n, "n_escapes": escaped}
    return out


def flat_metrics(op: dict) -> dict[str, float]:
    """The operating point as flat MLflow metrics: false_reject_rate[_lower|_upper], escape_rate[...],
    n_false_rejects, n_good, n_escapes, n_defective, and `<type>.escape_rate[...]` per defect type (nan entries dropped)."""
    keys = ("false_reject_rate", "false_reject_rate_lower", "false_reject_rate_upper", "escape_rate",
            "escape_rate_lower", "escape_rate_upper", "n_false_rejects", "n_good", "n_escapes", "n_defective")
    flat = {k: float(op["overall"][k]) for k in keys}
    for d, values in op["per_defect"].items():
        flat |= {f"{d}.{k}": float(values[k]) for k in ("escape_rate", "escape_rate_lower", "escape_rate_upper")}
    return {k: v for k, v in flat.items() if math.isfinite(v)}


def order_statistic_bound(n: int, k: int, confidence: float) -> float:
    """Upper `confidence` bound on the false-reject rate of the threshold t = k-th smallest of n exchangeable
    good calibration scores (reject when score > t). With continuous scores the FRR of t is distributed as
    Beta(n + 1 - k, k) over calibration sets (the probability mass above the k-th order statistic), so
    P(FRR <= bound) = confidence. k = n (the largest score) gives 1 - (1 - confidence)^(1/n)."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    return float(stats.beta.ppf(confidence, n + 1 - k, k))


def smallest_guaranteed_rank(n: int, target: float, confidence: float) -> int | None:
    """The smallest k (lowest threshold) whose order-statistic bound is <= target, or None when even the
    largest score (k = n) cannot guarantee it with n images."""
    lo, hi = 1, n
    if order_statistic_bound(n, n, confidence) > target:
        return None
    while lo < hi:  # the bound decreases as k grows
        mid = (lo + hi) // 2
        if order_statistic_bound(n, mid, confidence) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def min_images_for(target: float, confidence: float) -> int:
    """How many good calibration images the largest-score threshold needs to guarantee `target`."""
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target))
