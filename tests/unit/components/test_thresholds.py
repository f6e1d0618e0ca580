"""Tests for components.thresholds: quantile semantics, round trips, validation, decisions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from components.thresholds import Threshold, calibrate


def test_hundred_scores_one_percent_rejects_at_most_one() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(100, dtype=float))
    t = calibrate(scores, false_reject_rate=0.01)
    # 'higher' quantile: index ceil(99 * 0.99) = 99 -> the largest score; '>' rejects none of them
    assert t.image == 99.0
    assert t.decide_image(scores).sum() <= 1
    assert t.n_calibration == 100 and t.false_reject_rate == 0.01 and t.pixel is None


def test_thousand_scores_hand_worked_index() -> None:
    scores = np.arange(1000, dtype=float)[::-1]
    t = calibrate(scores, false_reject_rate=0.01)
    assert t.image == 990.0  # ceil(999 * 0.99) = 990
    assert t.decide_image(scores).sum() == 9  # 991..999; at most 1% of 1000


@pytest.mark.parametrize("frr", [0.001, 0.01, 0.05, 0.1, 0.2, 1 / 3, 0.5])
def test_rejection_rate_never_exceeds_frr(frr: float) -> None:
    rng = np.random.default_rng(int(frr * 1000))
    for n in [1, 2, 3, 7, 10, 19, 20, 21, 99, 100, 101, 333, 1000]:
        scores = rng.normal(size=n)
        t = calibrate(scores, false_reject_rate=frr)
        assert t.image == np.quantile(scores, 1 - frr, method="higher")
        assert t.decide_image(scores).sum() <= frr * n


def test_ties_at_the_threshold_are_accepted() -> None:
    t = calibrate(np.full(50, 2.5), false_reject_rate=0.1)
    assert t.image == 2.5
    assert not t.decide_image(np.full(50, 2.5)).any()


def test_pixel_threshold_is_quantile_of_per_image_max() -> None:
    maps = np.zeros((10, 4, 4), dtype=np.float32)
    for i in range(10):
        maps[i, i % 4, 1] = i  # per-image maxima 0..9
    t = calibrate(np.arange(10.0), maps, false_reject_rate=0.1)
    assert t.pixel == 9.0  # ceil(9 * 0.9) = 9 (index of the largest per-image max)
    t = calibrate(np.arange(10.0), maps, false_reject_rate=0.5)
    assert t.pixel == 5.0  # ceil(9 * 0.5) = 5
    flagged = t.decide_pixels(maps)
    assert flagged.shape == maps.shape
    assert flagged.reshape(10, -1).any(axis=1).sum() == 4  # images 6..9, <= 0.5 of 10


@pytest.mark.parametrize(
    ("scores", "maps", "frr", "message"),
    [
        (np.array([]), None, 0.01, "zero good images"),
        (np.ones(10), None, 0.0, "false_reject_rate"),
        (np.ones(10), None, 0.6, "false_reject_rate"),
        (np.ones(10), None, -0.1, "false_reject_rate"),
        (np.array([1.0, np.nan, 2.0, np.inf]), None, 0.1, "2 of 4 good image scores are not finite"),
        (np.ones((2, 5)), None, 0.1, "must be \\(N,\\)"),
        (np.ones(3), np.ones((4, 2, 2)), 0.1, "N = 3"),
        (np.ones(3), np.full((3, 2, 2), np.nan), 0.1, "12 of 12 good anomaly-map pixels"),
    ],
)
def test_calibrate_rejects_bad_input(scores: np.ndarray, maps: np.ndarray | None, frr: float,
                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate(scores, maps, false_reject_rate=frr)


@pytest.mark.parametrize("with_maps", [True, False])
def test_round_trip_through_json(with_maps: bool) -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((20, 3, 3)) if with_maps else None
    t = calibrate(rng.random(20), maps, false_reject_rate=0.05)
    again = Threshold.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again == t
    assert set(t.to_dict()) == {"image", "pixel", "false_reject_rate", "n_calibration", "confidence",
                                "frr_upper_bound", "guaranteed"}  # calibration (method) only when given
    old = {k: v for k, v in t.to_dict().items() if k in GOOD}  # a threshold.json saved before the bound
    assert Threshold.from_dict(old).frr_upper_bound is None


GOOD = {"image": 1.5, "pixel": 0.7, "false_reject_rate": 0.01, "n_calibration": 200}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": "1.5"}, "'image' must be a finite number"),
        ({"image": float("nan")}, "'image' must be a finite number"),
        ({"pixel": [0.7]}, "'pixel' must be a finite number or null"),
        ({"false_reject_rate": 0.7}, "'false_reject_rate' must be a number in"),
        ({"n_calibration": 200.0}, "'n_calibration' must be an integer"),
        ({"n_calibration": True}, "'n_calibration' must be an integer"),
        ({"n_calibration": 0}, "'n_calibration' must be an integer >= 1"),
        ({"extra": 1}, "unknown \\['extra'\\]"),
    ],
)
def test_from_dict_errors(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Threshold.from_dict(GOOD | change)


def test_from_dict_missing_key_and_source_name() -> None:
    with pytest.raises(ValueError, match="threshold.json: .*missing \\['pixel'\\]"):
        Threshold.from_dict({k: v for k, v in GOOD.items() if k != "pixel"}, source="threshold.json")
    with pytest.raises(ValueError, match="must be a mapping"):
        Threshold.from_dict([1, 2, 3])  # type: ignore[arg-type]
    assert Threshold.from_dict(GOOD | {"pixel": None, "image": 2}).image == 2.0


def test_decisions_are_strictly_greater_and_refuse_nan() -> None:
    t = Threshold(image=1.0, pixel=0.5, false_reject_rate=0.01, n_calibration=100)
    np.testing.assert_array_equal(t.decide_image(np.array([0.5, 1.0, 1.0001, math.inf])),
                                  [False, False, True, True])
    np.testing.assert_array_equal(t.decide_pixels(np.array([[0.5, 0.6], [0.0, 2.0]])),
                                  [[False, True], [False, True]])
    with pytest.raises(ValueError, match="1 of 2 image scores are nan"):
        t.decide_image(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="anomaly-map pixels are nan"):
        t.decide_pixels(np.full((1, 2, 2), np.nan))
    no_pixel = Threshold(image=1.0, pixel=None, false_reject_rate=0.01, n_calibration=100)
    with pytest.raises(ValueError, match="no pixel threshold"):
        no_pixel.decide_pixels(np.zeros((2, 2)))
