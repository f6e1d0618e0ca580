"""The pure promotion gate: floors without a champion, tolerances against one, latency budget, nan."""

from __future__ import annotations

import math

import pytest

from components.config import PromotionConfig
from flows.promote import decide, metrics_from_tags

CFG = PromotionConfig(image_auroc_tolerance=0.01, aupro_tolerance=0.02, latency_budget_ms=100.0,
                      min_image_auroc=0.7, min_aupro=0.3, max_false_reject_rate=None, max_escape_rate=None)  # operating point: below
CHAMP = {"image_auroc": 0.90, "aupro": 0.80, "ms_per_image": 50.0}


def cand(**overrides):
    return {"image_auroc": 0.90, "aupro": 0.80, "ms_per_image": 50.0, **overrides}


def test_first_version_passes_the_floors():
    d = decide(cand(image_auroc=0.71, aupro=0.31), None, CFG)
    assert d.promote is True
    assert any("no champion" in r for r in d.reasons)
    checks = [r for r in d.reasons if r.startswith(("image_auroc", "aupro", "ms_per_image"))]
    assert len(checks) == 3 and all(r.endswith("pass") for r in checks)
    assert "(floor)" in checks[0] and "0.7000" in checks[0]


@pytest.mark.parametrize("overrides, failing", [
    ({"image_auroc": 0.69}, "image_auroc"),
    ({"aupro": 0.29}, "aupro"),
    ({"ms_per_image": 100.5}, "ms_per_image"),
])
def test_first_version_below_a_floor_is_rejected(overrides, failing):
    d = decide(cand(**overrides), None, CFG)
    assert d.promote is False
    failed = [r for r in d.reasons if r.endswith("fail")]
    assert len(failed) == 1 and failed[0].startswith(failing)


def test_equal_to_champion_or_within_tolerance_is_promoted():
    assert decide(cand(), CHAMP, CFG).promote is True
    d = decide(cand(image_auroc=0.891, aupro=0.781), CHAMP, CFG)  # worse, but inside both tolerances
    assert d.promote is True and len([r for r in d.reasons if "not gated" not in r]) == 3


@pytest.mark.parametrize("overrides, failing", [
    ({"image_auroc": 0.889}, "image_auroc"),   # 0.90 - 0.01 = 0.89
    ({"aupro": 0.779}, "aupro"),               # 0.80 - 0.02 = 0.78
    ({"ms_per_image": 101.0}, "ms_per_image"),
])
def test_worse_than_champion_beyond_tolerance_is_rejected(overrides, failing):
    d = decide(cand(**overrides), CHAMP, CFG)
    assert d.promote is False
    [failed] = [r for r in d.reasons if r.endswith("fail")]
    assert failed.startswith(failing)


def test_floors_do_not_apply_against_a_champion():
    weak_champ = {"image_auroc": 0.60, "aupro": 0.10}
    assert decide(cand(image_auroc=0.65, aupro=0.12), weak_champ, CFG).promote is True


@pytest.mark.parametrize("key", ["image_auroc", "aupro", "ms_per_image"])
@pytest.mark.parametrize("bad", [math.nan, None, "nan", "not-a-number"])
def test_nan_or_missing_candidate_metric_never_passes(key, bad):
    for champion in (None, CHAMP):
        d = decide(cand(**{key: bad}), champion, CFG)
        assert d.promote is False, (key, bad, champion)
        assert any(r.startswith(key) and "not a number" in r for r in d.reasons)
    missing = cand()
    del missing[key]
    assert decide(missing, CHAMP, CFG).promote is False


def test_nan_champion_metric_cannot_be_compared():
    d = decide(cand(), {"image_auroc": 0.9, "aupro": math.nan}, CFG)
    assert d.promote is False
    assert any(r.startswith("aupro") and "reference" in r for r in d.reasons)


def test_reasons_state_values_and_thresholds():
    d = decide(cand(image_auroc=0.95), CHAMP, CFG)
    auroc = next(r for r in d.reasons if r.startswith("image_auroc"))
    assert "0.9500" in auroc and "0.8900" in auroc and "champion 0.9000" in auroc


def test_metrics_from_tags_parses_and_keeps_nan():
    got = metrics_from_tags({"metrics.image_auroc": "0.9", "metrics.aupro": "nan", "git_commit": "abc",
                             "metrics.crack.image_auroc": "1.0", "metrics.bad": "x"})
    assert got["image_auroc"] == 0.9 and got["crack.image_auroc"] == 1.0
    assert math.isnan(got["aupro"]) and math.isnan(got["bad"]) and "git_commit" not in got


def test_aupro_is_not_gated_when_the_pinned_data_has_no_masks():
    cfg = PromotionConfig(min_aupro=0.5, max_false_reject_rate=None, max_escape_rate=None)
    unmasked = {"image_auroc": 0.9, "aupro": float("nan"), "ms_per_image": 10.0, "n_masked": 0}
    first = decide(unmasked, None, cfg)
    assert first.promote and any("no defect masks" in r for r in first.reasons)
    against = decide(unmasked, {"image_auroc": 0.95, "aupro": float("nan")}, cfg)
    assert not against.promote  # image AUROC still gated
    masked = {**unmasked, "n_masked": 3}
    assert not decide(masked, None, cfg).promote  # with masks, a NaN AUPRO still fails


OP_CFG = CFG.model_copy(update={"max_false_reject_rate": 0.1, "max_escape_rate": 0.5})


def op_cand(rejects: int, n_good: int = 14, escapes: int = 3, n_bad: int = 32, **overrides):
    from components.operating_point import clopper_pearson

    frr_lo, frr_hi = clopper_pearson(rejects, n_good)
    esc_lo, esc_hi = clopper_pearson(escapes, n_bad)
    return cand(false_reject_rate=rejects / n_good, false_reject_rate_lower=frr_lo, false_reject_rate_upper=frr_hi,
                n_false_rejects=rejects, n_good=n_good, escape_rate=escapes / n_bad, escape_rate_lower=esc_lo,
                escape_rate_upper=esc_hi, n_escapes=escapes, n_defective=n_bad, **overrides)


def test_operating_point_gate_refuses_a_model_rejecting_every_good_image():
    """Issue 15: 14 of 14 good images rejected with image AUROC 1.0 used to be promoted."""
    d = decide(op_cand(14, image_auroc=1.0, aupro=0.9), None, OP_CFG)
    assert d.promote is False
    reason = next(r for r in d.reasons if r.startswith("false_reject_rate"))
    assert "false_reject_rate 1.0000 (14/14 images, 95% CI 0.768-1.000) > promotion.max_false_reject_rate 0.1: fail" == reason
    assert decide(op_cand(1), None, OP_CFG).promote is True  # 1/14 = 0.071 <= 0.1
    assert decide(op_cand(2), CHAMP, OP_CFG).promote is False  # also against a champion


def test_operating_point_gate_escape_bound_and_missing_values():
    d = decide(op_cand(0, escapes=20), None, OP_CFG)
    assert d.promote is False and any(r.startswith("escape_rate 0.6250 (20/32") and r.endswith("fail")
                                      for r in d.reasons)
    assert decide(cand(), None, OP_CFG).promote is False  # no operating point measured: never passes
    d = decide(cand(), None, CFG)  # both bounds null: not gated, and said so
    assert d.promote is True and sum("not gated" in r for r in d.reasons) == 2
