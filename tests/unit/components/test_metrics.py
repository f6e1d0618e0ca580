"""Tests for components.metrics: sklearn cross-checks, hand-worked cases, a brute-force PRO oracle."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from components import metrics
from components.metrics import (
    EvaluationReport,
    ScoredSample,
    aupro,
    evaluate,
    image_metrics,
    pixel_metrics,
    pr_curve_points,
    pro_curve,
    roc_curve_points,
)

# ---------------------------------------------------------------------------------------------- helpers


def _sk_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f1.max())


def _random_case(rng: np.random.Generator, n: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes
    scores = rng.integers(0, 8, n) / 4.0 if tied else rng.normal(size=n) + labels
    return labels, scores


def _brute_force_pro(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One full pass over all pixels per distinct threshold: the slow, obvious definition."""
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(amap, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [], []
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fprs.append((flagged & normal).sum() / normal.sum())
        pros.append(np.mean([(amap >= t)[region].mean() for amap, region in regions]))
    return np.array(fprs), np.array(pros)


# A hand-built image (2, 5): region A = 1 pixel, region B = 3 pixels, 6 normal pixels.
#   mask  A . B B .      scores 0.9 0.7 0.8 0.4 0.3
#         . . B . .             0.1 0.1 0.2 0.4 0.0
# Descending thresholds -> (fpr, pro):  0.9 -> (0, 1/2)   [A whole]
#   0.8 -> (0, 2/3) [B 1/3]   0.7 -> (1/6, 2/3)   0.4 -> (2/6, 5/6) [a normal AND B's 2nd pixel: a slope]
#   0.3 -> (3/6, 5/6)   0.2 -> (3/6, 1)   0.1 -> (5/6, 1)   0.0 -> (1, 1)
HAND_MASK = np.array([[[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]]], dtype=bool)
HAND_MAP = np.array([[[0.9, 0.7, 0.8, 0.4, 0.3], [0.1, 0.1, 0.2, 0.4, 0.0]]], dtype=np.float32)
HAND_FPR = [0, 0, 0, 1 / 6, 2 / 6, 3 / 6, 3 / 6, 5 / 6, 1, 1]
HAND_PRO = [0, 1 / 2, 2 / 3, 2 / 3, 5 / 6, 5 / 6, 1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- image


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tied", [False, True])
def test_image_metrics_match_sklearn(seed: int, tied: bool) -> None:
    labels, scores = _random_case(np.random.default_rng(seed), 200, tied)
    m = image_metrics(labels, scores)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert m["f1_max"] == pytest.approx(_sk_f1_max(labels, scores), abs=1e-9)


def test_image_metrics_hand_worked() -> None:
    # thresholds 0.9 / 0.8 / 0.7 / 0.1 -> (P, R) = (1, 1/2) (1/2, 1/2) (2/3, 1) (1/2, 1)
    # F1 = 2/3, 1/2, 4/5, 2/3; AP = 1/2 * 1 + 1/2 * 2/3; AUROC = 3 of 4 (pos, neg) pairs in order.
    m = image_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert m == pytest.approx({"auroc": 0.75, "ap": 5 / 6, "f1_max": 0.8})


def test_perfect_inverted_and_tied_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    perfect = image_metrics(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9]))
    assert perfect == pytest.approx({"auroc": 1.0, "ap": 1.0, "f1_max": 1.0})
    assert image_metrics(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1]))["auroc"] == pytest.approx(0.0)
    tied = image_metrics(labels, np.full(5, 3.0))
    # one threshold flags everything: precision = prevalence 2/5, recall 1
    assert tied == pytest.approx({"auroc": 0.5, "ap": 0.4, "f1_max": 2 * 0.4 / 1.4})


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_one_class_gives_nan_and_a_warning(labels: list[int], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="components.metrics"):
        m = image_metrics(np.array(labels, dtype=int), np.linspace(0, 1, len(labels)))
    assert set(m) == {"auroc", "ap", "f1_max"}
    assert all(math.isnan(v) for v in m.values())
    assert "only one class" in caplog.text


def test_image_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_metrics(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="2 of 3 image scores are not finite"):
        image_metrics(np.array([0, 1, 1]), np.array([0.1, np.nan, np.inf]))
    with pytest.raises(ValueError, match="must both be"):
        image_metrics(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


def test_curve_points_match_sklearn() -> None:
    labels, scores = _random_case(np.random.default_rng(7), 120, tied=True)
    fpr, tpr, thr = roc_curve_points(labels, scores)
    sk_fpr, sk_tpr, sk_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    precision, recall, pr_thr = pr_curve_points(labels, scores)
    sk_p, sk_r, sk_t = precision_recall_curve(labels, scores)
    # sklearn: ascending thresholds and a final (precision 1, recall 0) point
    np.testing.assert_allclose(precision, sk_p[:-1][::-1])
    np.testing.assert_allclose(recall, sk_r[:-1][::-1])
    np.testing.assert_allclose(pr_thr, sk_t[::-1])
    with pytest.raises(ValueError, match="both good"):
        roc_curve_points(np.array([1, 1]), np.array([0.1, 0.2]))


# ---------------------------------------------------------------------------------------------- pixel


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 16, 12)) < 0.15
    maps = (rng.integers(0, 50, masks.shape) / 10 + masks * rng.random(masks.shape)).astype(np.float32)
    m = pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert m["f1_max"] == pytest.approx(_sk_f1_max(y, s), abs=1e-6)


def test_chunked_accumulation_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    masks = rng.random((2, 20, 20)) < 0.2
    maps = rng.random(masks.shape).astype(np.float32) + masks * 0.3
    whole_pixels, whole_pro = pixel_metrics(masks, maps), pro_curve(masks, maps)
    monkeypatch.setattr(metrics, "_CHUNK", 7)
    assert pixel_metrics(masks, maps) == pytest.approx(whole_pixels, abs=1e-12)
    np.testing.assert_allclose(pro_curve(masks, maps), whole_pro, atol=1e-12)


def test_pixel_metrics_shape_and_nan_errors() -> None:
    with pytest.raises(ValueError, match="must both be \\(N, H, W\\)"):
        pixel_metrics(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), np.float32))
    bad = np.zeros((1, 4, 4), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 16 anomaly-map pixels are not finite"):
        pixel_metrics(np.ones((1, 4, 4), bool), bad)


# ---------------------------------------------------------------------------------------------- PRO


def test_pro_curve_hand_built() -> None:
    fpr, pro = pro_curve(HAND_MASK, HAND_MAP)
    np.testing.assert_allclose(fpr, HAND_FPR, atol=1e-7)
    np.testing.assert_allclose(pro, HAND_PRO, atol=1e-7)


def test_aupro_hand_built_with_interpolation() -> None:
    # [0, 1/6]: pro 2/3 -> 1/9. [1/6, 0.3] lies on the sloped segment (1/6, 2/3)-(2/6, 5/6):
    # pro(0.3) = 2/3 + (1/6) * 0.8 = 0.8, trapezoid 0.5 * (2/3 + 0.8) * (0.3 - 1/6) = 22/225.
    # (1/9 + 22/225) / 0.3 = 94/135. Without the interpolation it would be (1/9) / 0.3.
    assert aupro(HAND_MASK, HAND_MAP, 0.3) == pytest.approx(94 / 135, abs=1e-6)
    # fpr_limit on an existing point (0.5): 1/9 + 0.5 * (2/3 + 5/6) / 6 + (5/6) / 6 = 3/8, / 0.5
    assert aupro(HAND_MASK, HAND_MAP, 0.5) == pytest.approx(3 / 4, abs=1e-6)
    assert aupro(HAND_MASK, HAND_MAP, 1.0) == pytest.approx(np.trapezoid(HAND_PRO, HAND_FPR), abs=1e-6)


def test_pro_curve_matches_brute_force() -> None:
    rng = np.random.default_rng(11)
    masks = np.zeros((3, 14, 14), dtype=bool)
    masks[0, 2:5, 2:9] = True  # big region
    masks[0, 10, 10] = True  # one-pixel region
    masks[1, 6:8, 1:3] = True
    masks[1, 8, 3] = True  # diagonal neighbour: the same region under 8-connectivity
    maps = (rng.integers(0, 30, masks.shape) / 10 + masks * rng.random(masks.shape)).astype(np.float32)
    fpr, pro = pro_curve(masks, maps)
    ref_fpr, ref_pro = _brute_force_pro(masks, maps)
    np.testing.assert_allclose(fpr[1:-1], ref_fpr, atol=1e-9)
    np.testing.assert_allclose(pro[1:-1], ref_pro, atol=1e-9)


def test_pro_uses_eight_connectivity() -> None:
    # a and b touch diagonally (one region of 2 under 8-connectivity), c is alone. Flag a only:
    # 8-connected: (1/2 + 0) / 2 = 1/4; 4-connected would give 1/3.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 4, 4] = True
    maps = np.zeros((1, 5, 5), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    _, pro = pro_curve(masks, maps)
    assert pro[1] == pytest.approx(0.25)


def test_aupro_perfect_detector_and_no_regions(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    masks = rng.random((2, 10, 10)) < 0.2
    maps = rng.random(masks.shape).astype(np.float32) + 2.0 * masks
    assert aupro(masks, maps) == pytest.approx(1.0)
    with caplog.at_level(logging.WARNING, logger="components.metrics"):
        assert math.isnan(aupro(np.zeros_like(masks), maps))
    assert "0 defect regions" in caplog.text
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)


def test_aupro_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(9)
    masks = rng.random((2, 12, 12)) < 0.25
    maps = rng.integers(0, 40, masks.shape) / 8 + masks * rng.integers(0, 8, masks.shape) / 8
    base = aupro(masks, maps.astype(np.float32))
    assert 0.0 < base < 1.0
    for transformed in (np.exp(maps), 3.0 * maps - 7.0, maps**3):
        assert aupro(masks, transformed.astype(np.float32)) == pytest.approx(base, abs=1e-9)


def test_pro_curve_on_a_threshold_grid() -> None:
    fpr, pro = pro_curve(HAND_MASK, HAND_MAP, num_thresholds=4)
    # (0, 0), then thresholds 0.9, 0.45, 0.0 -> points at scores >= 0.9, >= 0.45 (0.7), >= 0.0
    np.testing.assert_allclose(fpr, [0, 0, 1 / 6, 1], atol=1e-7)
    np.testing.assert_allclose(pro, [0, 1 / 2, 2 / 3, 1], atol=1e-7)
    with pytest.raises(ValueError, match="num_thresholds"):
        pro_curve(HAND_MASK, HAND_MAP, num_thresholds=1)


# ---------------------------------------------------------------------------------------------- evaluate


def _sample(name: str, defect: str, label: int, rng: np.random.Generator, masked: bool = True) -> ScoredSample:
    mask = None
    amap = rng.random((8, 8)).astype(np.float32)
    if label == 1 and masked:
        mask = np.zeros((8, 8), dtype=bool)
        mask[2:5, 3:6] = True
        amap[mask] += rng.random() * 0.8
    return ScoredSample(name=name, defect_type=defect, label=label, score=float(amap.max()),
                        anomaly_map=amap, mask=mask)


def _records(rng: np.random.Generator) -> list[ScoredSample]:
    good = [_sample(f"good/{i}.png", "good", 0, rng) for i in range(4)]
    crack = [_sample(f"crack/{i}.png", "crack", 1, rng) for i in range(3)]
    hole = [_sample("hole/0.png", "hole", 1, rng), _sample("hole/1.png", "hole", 1, rng, masked=False)]
    return good + crack + hole


def _expected(records: list[ScoredSample]) -> dict[str, float]:
    labels = np.array([r.label for r in records])
    out = {f"image_{k}": v for k, v in image_metrics(labels, np.array([r.score for r in records])).items()}
    pix = [r for r in records if r.label == 0 or r.mask is not None]
    maps = np.stack([r.anomaly_map for r in pix])
    masks = np.stack([np.zeros((8, 8), bool) if r.mask is None else r.mask for r in pix])
    out |= {f"pixel_{k}": v for k, v in pixel_metrics(masks, maps).items()}
    out["aupro"] = aupro(masks, maps)
    return out


def test_evaluate_overall_and_per_defect(caplog: pytest.LogCaptureFixture) -> None:
    records = _records(np.random.default_rng(0))
    with caplog.at_level(logging.WARNING, logger="components.metrics"):
        report = evaluate(records)
    assert isinstance(report, EvaluationReport)
    assert caplog.text.count("hole/1.png") == 1  # named once, not once per scope
    assert report.overall == pytest.approx(_expected(records) | {"n_images": 9, "n_defective": 5,
                                                                  "n_masked": 4}, nan_ok=True)
    assert list(report.per_defect) == ["crack", "hole"]
    good = records[:4]
    assert report.per_defect["crack"] == pytest.approx(_expected(good + records[4:7]) | {
        "n_images": 7, "n_defective": 3, "n_masked": 3})
    assert report.per_defect["hole"] == pytest.approx(_expected(good + records[7:]) | {
        "n_images": 6, "n_defective": 2, "n_masked": 1})


def test_report_to_dict_and_table() -> None:
    records = _records(np.random.default_rng(1))
    only_good = [r for r in records if r.label == 0]
    report = evaluate(only_good)  # one class: every metric nan
    encoded = json.dumps(report.to_dict(), allow_nan=False)
    assert json.loads(encoded)["overall"]["image_auroc"] is None
    report = evaluate(records)
    rows = report.table()
    assert [row["scope"] for row in rows] == ["overall", "crack", "hole"]
    assert rows[0]["aupro"] == report.overall["aupro"]
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["per_defect"]["crack"]["n_images"] == 7


def test_evaluate_rejects_mixed_shapes_and_bad_samples() -> None:
    records = _records(np.random.default_rng(2))
    odd = ScoredSample("crack/odd.png", "crack", 1, 0.5, np.zeros((8, 9), np.float32), None)
    with pytest.raises(ValueError, match="crack/odd.png.*\\(8, 9\\)"):
        evaluate(records + [odd])
    bad_mask = ScoredSample("crack/m.png", "crack", 1, 0.5, np.zeros((8, 8), np.float32), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="crack/m.png.: mask shape"):
        evaluate(records + [bad_mask])
    bad_label = ScoredSample("x.png", "crack", 2, 0.5, np.zeros((8, 8), np.float32), None)
    with pytest.raises(ValueError, match="x.png.*label"):
        evaluate(records + [bad_label])
    with pytest.raises(ValueError, match="no scored samples"):
        evaluate([])
