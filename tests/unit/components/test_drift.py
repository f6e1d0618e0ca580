"""Drift statistics (components/drift.py): alarms on a shifted window, rarely on an unshifted one."""

from __future__ import annotations

import numpy as np
import pytest

from components.drift import drift_check, expected_reject_rate, persistent, psi


def _reference(rng, n=31):
    return {"image_scores": rng.normal(1.0, 0.1, n).tolist(), "brightness": rng.normal(0.5, 0.02, n).tolist(),
            "contrast": rng.normal(0.2, 0.01, n).tolist()}


def _window(rng, n=50, score_shift=0.0, brightness_shift=0.0, threshold=1.3):
    scores = rng.normal(1.0 + score_shift, 0.1, n)
    return {"scores": scores.tolist(), "rejected": (scores > threshold).tolist(),
            "brightness": rng.normal(0.5 + brightness_shift, 0.02, n).tolist(),
            "contrast": rng.normal(0.2, 0.01, n).tolist()}


def test_shifted_window_alarms_and_names_the_tests() -> None:
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    check = drift_check(ref, _window(rng, score_shift=0.3, brightness_shift=0.1), 1.3, 0.01, alpha=0.01)
    assert check["drift"] is True
    names = " ".join(check["reasons"])
    assert "score_ks" in names and "brightness_ks" in names and "reject_rate" in names
    assert check["n_window"] == 50 and check["level"] == pytest.approx(0.01 / 4)


def test_unshifted_windows_alarm_at_most_about_alpha() -> None:
    rng = np.random.default_rng(1)
    alarms = 0
    for _ in range(300):
        ref = _reference(rng)
        alarms += drift_check(ref, _window(rng), max(ref["image_scores"]), 0.01, alpha=0.05)["drift"]
    assert alarms / 300 <= 0.09  # Bonferroni: <= 0.05 in expectation, binomial noise over 300


def test_expected_reject_rate_and_psi_and_persistence() -> None:
    assert expected_reject_rate(list(range(31)), 30, 0.01) == pytest.approx(1 / 32)
    assert expected_reject_rate(list(range(1000)), 999, 0.01) == 0.01  # at least the target
    same = np.random.default_rng(2).normal(size=5000)
    assert psi(same[:2500], same[2500:]) < 0.02 and psi(same, same + 1.0) > 0.5
    assert persistent([False, True, True], 2) and not persistent([True, False, True], 2)
    assert not persistent([True], 2)
    with pytest.raises(ValueError, match="needs scores on both sides"):
        drift_check({"image_scores": [1.0]}, {"scores": [], "rejected": []}, 1.0, 0.01)


def test_a_layout_change_moves_the_centroid_distance_and_nothing_else() -> None:
    """Parts whose bright half moves from left to right: same brightness, same contrast, the thumbnail
    embedding (components.training.thumbnails) far from the calibration centroid."""
    import torch

    from components.training import brightness_contrast, centroid_distances, thumbnails

    rng = np.random.default_rng(3)

    def parts(n: int, bright_left: bool) -> torch.Tensor:
        x = torch.from_numpy(rng.uniform(0.0, 0.2, (n, 3, 32, 32))).float()
        half = slice(0, 16) if bright_left else slice(16, 32)
        x[:, :, :, half] += 0.6
        return x

    calib, same, moved = parts(30, True), parts(40, True), parts(40, False)
    e = thumbnails(calib)
    assert e.shape == (30, 3 * 8 * 8)
    others = (e.sum(axis=0)[None] - e) / 29
    ref = {"image_scores": rng.normal(1.0, 0.1, 30).tolist(), "centroid_distance": np.linalg.norm(e - others, axis=1).tolist()}
    b, c = brightness_contrast(calib)
    ref |= {"brightness": b, "contrast": c}
    centroid = e.mean(axis=0).tolist()

    def window(images: torch.Tensor) -> dict:
        b, c = brightness_contrast(images)
        return {"scores": rng.normal(1.0, 0.1, len(images)).tolist(), "rejected": [False] * len(images),
                "brightness": b, "contrast": c, "centroid_distance": centroid_distances(images, centroid)}

    quiet = drift_check(ref, window(same), 2.0, 0.01, alpha=0.01)
    loud = drift_check(ref, window(moved), 2.0, 0.01, alpha=0.01)
    assert not quiet["drift"], quiet["reasons"]
    assert loud["drift"] and [r.split(":")[0] for r in loud["reasons"]] == ["centroid_distance_ks"], loud["reasons"]
