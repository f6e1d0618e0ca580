"""The unified model's per-line gate and mean metrics (flows.unified: pure helpers, no services)."""

from __future__ import annotations

import math

import pytest

from components.config import PromotionConfig
from flows.unified import combined_hash, decide_lines, mean_metrics

CFG = PromotionConfig(image_auroc_tolerance=0.01, aupro_tolerance=0.01, latency_budget_ms=100.0,
                      min_image_auroc=0.6, min_aupro=0.0, max_false_reject_rate=None, max_escape_rate=None)


def _m(auroc: float, aupro: float = 0.5, ms: float = 10.0) -> dict:
    return {"image_auroc": auroc, "aupro": aupro, "ms_per_image": ms}


def test_decide_lines_promotes_only_if_every_line_passes() -> None:
    refs = {"a": _m(0.90), "b": _m(0.80)}
    ok = decide_lines({"a": _m(0.95), "b": _m(0.80)}, refs, CFG)
    assert ok.promote and all(r.startswith(("a: ", "b: ")) for r in ok.reasons)
    worse_b = decide_lines({"a": _m(0.99), "b": _m(0.70)}, refs, CFG)
    assert not worse_b.promote
    assert [r for r in worse_b.reasons if r.endswith(": fail")] == \
        ["b: image_auroc 0.7000 < 0.7900 (champion 0.8000 - tolerance 0.01): fail"]
    # a line the champion has no reference for is held to the absolute floors
    floors = decide_lines({"a": _m(0.95), "c": _m(0.55)}, {"a": _m(0.90), "c": None}, CFG)
    assert not floors.promote and any(r.startswith("c: no champion yet") for r in floors.reasons)


def test_mean_metrics_and_combined_hash() -> None:
    per_line = {"a": {"image_auroc": 0.8, "aupro": 0.4, "x.image_auroc": 1.0, "only_a": 1.0},
                "b": {"image_auroc": 1.0, "aupro": math.nan, "x.image_auroc": 0.0}}
    means = mean_metrics(per_line)
    assert set(means) == {"image_auroc", "aupro"} and means["image_auroc"] == pytest.approx(0.9)
    assert math.isnan(means["aupro"])
    assert combined_hash({"a": "1", "b": "2"}) == combined_hash({"b": "2", "a": "1"}) != combined_hash({"a": "1"})
