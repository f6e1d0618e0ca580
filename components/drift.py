"""Drift of a line's recent decisions against its calibration: pure statistics (numbers in, verdict out).

The reference is what the model's calibration saw (components/training.py `calibration_`): the good
images' out-of-fold scores and their brightness / contrast. A window is the latest recorded decisions.

    check = drift_check(reference, window, alpha=0.01, psi_max=None)
    check["drift"], check["reasons"], check["tests"]["score_ks"]["p_value"]

Tests (each a p-value; the window drifts when any is below alpha / number of tests, Bonferroni, so one
check of an unshifted window alarms with probability <= alpha):
- score_ks: one-sided two-sample Kolmogorov-Smirnov, are the window's scores stochastically LARGER than the
  calibration scores (more anomalous)? One-sided because the deployed model was fitted on all folds, so its
  scores on new good images run slightly BELOW the out-of-fold reference: a two-sided test would alarm on that.
- reject_rate: one-sided binomial test of the window's rejects against the expected false-reject rate of
  the threshold (the conformal rate (n + 1 - k) / (n + 1) of its rank k among the n calibration scores, at
  least the configured target). More defective parts also raise it: that is worth an alert too.
- brightness_ks, contrast_ks: two-sided KS of the image statistics (lighting / camera changes).
- centroid_distance_ks: one-sided KS, are the window images FARTHER from the calibration images' centroid
  (components/training.thumbnails: an 8 x 8 colour thumbnail as the embedding, pixel space, the same for
  every method) than the calibration images are from the centroid of the others? Catches a change of the
  scene's layout that leaves brightness and contrast alone. Models calibrated before it have no centroid:
  the test is then left out.
PSI (population stability index, 10 reference-quantile bins) is reported; it alarms only when psi_max is
set, because on small samples it is large by chance: E[PSI] ~ (bins - 1) (1 / n_ref + 1 / n_window), 0.47
for 31 calibration images and a window of 50.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

PSI_BINS = 10


def psi(reference: np.ndarray, window: np.ndarray, bins: int = PSI_BINS, eps: float = 1e-4) -> float:
    """Population stability index of window (M,) against reference (N,), bins at reference quantiles."""
    reference, window = np.asarray(reference, float), np.asarray(window, float)
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1) / reference.size
    win = np.bincount(np.searchsorted(edges, window, side="right"), minlength=edges.size + 1) / window.size
    ref, win = np.clip(ref, eps, None), np.clip(win, eps, None)
    return float(np.sum((win - ref) * np.log(win / ref)))


def expected_reject_rate(reference_scores: Sequence[float], threshold: float, target: float) -> float:
    """The threshold's expected false-reject rate on new good images: (n + 1 - k) / (n + 1) with k the
    number of calibration scores <= threshold (exchangeability), and at least `target`."""
    scores = np.asarray(reference_scores, float)
    k = int(np.count_nonzero(scores <= threshold))
    return max(target, (scores.size + 1 - k) / (scores.size + 1))


def drift_check(reference: Mapping[str, Sequence[float]], window: Mapping[str, Sequence[float]],
                threshold: float, target_frr: float, alpha: float = 0.01,
                psi_max: float | None = None) -> dict:
    """reference: {"image_scores", "brightness"?, "contrast"?} from the calibration; window: {"scores",
    "rejected" (bool per decision), "brightness"?, "contrast"?, "centroid_distance"?} (statistics only for
    images that were kept).
    -> {"drift", "reasons", "tests": {name: {...}}, "n_window", "psi", "expected_frr", "reject_rate"}."""
    ref_scores = np.asarray(reference["image_scores"], float)
    scores = np.asarray(window["scores"], float)
    rejected = np.asarray(window["rejected"], bool)
    if scores.size == 0 or ref_scores.size == 0:
        raise ValueError(f"drift check needs scores on both sides (reference {ref_scores.size}, window {scores.size})")
    tests: dict[str, dict] = {}
    ks = stats.ks_2samp(scores, ref_scores, alternative="less")  # window CDF below: window scores larger
    tests["score_ks"] = {"statistic": float(ks.statistic), "p_value": float(ks.pvalue)}
    expected = expected_reject_rate(ref_scores, threshold, target_frr)
    n_rejects = int(rejected.sum())
    tests["reject_rate"] = {"statistic": n_rejects / rejected.size, "expected": expected, "n_rejects": n_rejects,
                            "p_value": float(stats.binomtest(n_rejects, rejected.size, expected, "greater").pvalue)}
    for stat, side in (("brightness", "two-sided"), ("contrast", "two-sided"), ("centroid_distance", "less")):
        ref, win = np.asarray(reference.get(stat) or [], float), np.asarray(window.get(stat) or [], float)
        if ref.size >= 2 and win.size >= 2:
            result = stats.ks_2samp(win, ref, alternative=side)
            tests[f"{stat}_ks"] = {"statistic": float(result.statistic), "p_value": float(result.pvalue),
                                   "window_mean": float(win.mean()), "reference_mean": float(ref.mean())}
    level = alpha / len(tests)
    reasons = [f"{name}: p = {t['p_value']:.2g} < {level:.2g} (alpha {alpha:g} / {len(tests)} tests)"
               for name, t in tests.items() if t["p_value"] < level]
    index = psi(ref_scores, scores)
    if psi_max is not None and index > psi_max:
        reasons.append(f"score PSI {index:.3f} > monitoring.psi_max {psi_max:g}")
    return {"drift": bool(reasons), "reasons": reasons, "tests": tests, "n_window": int(scores.size),
            "psi": index, "expected_frr": expected, "reject_rate": n_rejects / rejected.size,
            "level": level, "alpha": alpha}


def persistent(history: Sequence[bool], persist: int) -> bool:
    """True when the last `persist` checks (newest last) all drifted."""
    return len(history) >= persist and all(history[-persist:])
