"""Operating point (FRR / escape rate with intervals) and the order-statistic calibration bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.operating_point import (
    clopper_pearson,
    flat_metrics,
    min_images_for,
    operating_point,
    order_statistic_bound,
    smallest_guaranteed_rank,
)
from components.thresholds import calibrate


def test_clopper_pearson_known_values() -> None:
    low, high = clopper_pearson(0, 14)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 14))
    low, high = clopper_pearson(14, 14)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 14))
    low, high = clopper_pearson(3, 14)
    assert low < 3 / 14 < high
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))
    with pytest.raises(ValueError, match="successes <= trials"):
        clopper_pearson(5, 3)


def test_operating_point_counts_overall_and_per_defect() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.95, 0.4, 0.8, 0.2])
    types = ["good"] * 4 + ["crack", "crack", "hole", "hole"]
    op = operating_point(labels, scores, 0.5, types)
    o = op["overall"]
    assert (o["n_good"], o["n_false_rejects"], o["n_defective"], o["n_escapes"]) == (4, 1, 4, 2)
    assert o["false_reject_rate"] == 0.25 and o["escape_rate"] == 0.5
    assert o["false_reject_rate_lower"] < 0.25 < o["false_reject_rate_upper"]
    assert op["per_defect"]["crack"]["escape_rate"] == 0.5 and op["per_defect"]["hole"]["n_escapes"] == 1
    flat = flat_metrics(op)
    assert flat["false_reject_rate"] == 0.25 and "hole.escape_rate_upper" in flat
    # a score equal to the threshold is accepted (anomalous means strictly greater)
    assert operating_point(np.array([0]), np.array([0.5]), 0.5)["overall"]["n_false_rejects"] == 0


def test_order_statistic_bound_and_rank() -> None:
    assert order_statistic_bound(31, 31, 0.95) == pytest.approx(1 - 0.05 ** (1 / 31))
    assert smallest_guaranteed_rank(31, 0.01, 0.95) is None
    assert min_images_for(0.01, 0.95) == 299
    assert smallest_guaranteed_rank(299, 0.01, 0.95) == 299
    k = smallest_guaranteed_rank(1000, 0.05, 0.95)
    assert order_statistic_bound(1000, k, 0.95) <= 0.05 < order_statistic_bound(1000, k - 1, 0.95)


def test_calibrate_with_confidence_holds_its_bound_on_new_scores() -> None:
    """Coverage of the bound over many calibration sets: P(FRR of new scores <= bound) >= confidence."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        t = calibrate(rng.normal(size=400), false_reject_rate=0.05, confidence=0.9, method="crossfit")
        assert t.guaranteed and t.frr_upper_bound <= 0.05 and t.calibration == "crossfit"
        true_frr = 0.5 * math.erfc(t.image / math.sqrt(2))  # P(N(0,1) > t)
        hits += true_frr <= t.frr_upper_bound
    assert hits / 400 >= 0.86  # 0.9 nominal, binomial noise over 400 sets


def test_calibrate_says_when_the_rate_cannot_be_guaranteed(caplog: pytest.LogCaptureFixture) -> None:
    scores = np.arange(8.0)
    t = calibrate(scores, false_reject_rate=0.01, confidence=0.95)
    assert t.image == 7.0 and t.guaranteed is False
    assert t.frr_upper_bound == pytest.approx(1 - 0.05 ** (1 / 8))
    assert "cannot be guaranteed with 8 good calibration images (needs 299)" in caplog.text
