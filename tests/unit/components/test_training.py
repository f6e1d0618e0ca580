"""Tests for components.training and components.evaluation on the tiny on-disk line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import Config, validate
from components.data import LineSplit, scan_line
from components.detector import create_detector
from components.evaluation import evaluate_split, worst_misses
from components.metrics import ScoredSample
from components.training import fit_line, fit_options, to_uint8_image


def test_fit_line_holds_out_calibration_and_reports_progress(tiny_config: Config, tiny_line: Path) -> None:
    calls: list[tuple[str, int, int | None]] = []
    tiny_config = tiny_config.model_copy(update={"threshold": tiny_config.threshold.model_copy(
        update={"calibration": "holdout"})})
    result = fit_line(tiny_config, tiny_line, progress=lambda *a: calls.append(a))
    assert (result.n_fit, result.n_calibration) == (6, 2)  # 8 train images, calibration_fraction 0.25
    assert result.detector.is_fitted and result.detector.threshold_ is not None
    assert result.detector.threshold_.n_calibration == 2
    assert result.fit_seconds > 0 and result.calibration_seconds > 0
    stages = {stage for stage, _, _ in calls}
    assert {"features", "coreset", "calibration"} <= stages
    assert ("features", 6, 6) in calls and ("calibration", 2, 2) in calls
    limited = fit_line(tiny_config, tiny_line, max_train_images=4)
    assert (limited.n_fit, limited.n_calibration) == (3, 1)


def test_fit_line_crossfit_scores_every_train_image_out_of_fold(tiny_config: Config, tiny_line: Path) -> None:
    """crossfit (the default): the deployed model is fitted on all 8 train images, the threshold calibrated on
    8 out-of-fold scores, each from a model that did not see that image (a model scoring its own training
    images gives ~0 with PatchCore), and the calibration's scores/image statistics are kept for monitoring."""
    from components.training import crossfit_scores, fold_of

    assert tiny_config.threshold.calibration == "crossfit"
    result = fit_line(tiny_config, tiny_line)
    det = result.detector
    assert (result.n_fit, result.n_calibration) == (8, 8)
    t = det.threshold_
    assert t.n_calibration == 8 and t.calibration == "crossfit" and t.guaranteed is False
    assert t.frr_upper_bound == pytest.approx(1 - 0.05 ** (1 / 8))
    cal = det.calibration_
    assert len(cal["image_scores"]) == len(cal["brightness"]) == len(cal["contrast"]) == 8
    assert t.image == pytest.approx(max(cal["image_scores"]))
    in_sample = det.score(next(iter(_stream(result.split.train, tiny_config)))).image_scores
    assert np.median(cal["image_scores"]) > np.median(in_sample)  # out of fold: not scored by its own model
    folds = fold_of(result.split.train, 5, 0)
    assert sorted(np.bincount(folds).tolist()) == [1, 1, 2, 2, 2]
    images = crossfit_scores(tiny_config, result.split.train)  # the image path (no features) agrees
    assert np.allclose(images.image_scores, cal["image_scores"], rtol=1e-4)


def _stream(samples, cfg):
    from components.training import image_stream

    return image_stream(samples, cfg.data)


def test_fit_line_forwards_log_step_and_checkpoint_dir(tiny_config_for, tiny_line: Path, tmp_path: Path) -> None:
    """Dinomaly's fit takes log_step/checkpoint_dir: fit_line passes them on (one call per step, a checkpoint
    written); PatchCore's does not: they are filtered out instead of failing."""
    raw = tiny_config_for("dinomaly").to_dict()
    raw["detector"]["dinomaly"]["checkpoint_every"] = 3
    cfg = validate(raw)
    steps: list[tuple[int, dict]] = []
    result = fit_line(cfg, tiny_line, log_step=lambda step, m: steps.append((step, m)),
                      checkpoint_dir=tmp_path / "ckpt")
    iterations = cfg.detector.dinomaly.iterations
    assert [s for s, _ in steps] == list(range(1, iterations + 1))
    assert all({"loss", "lr"} <= set(m) and np.isfinite(m["loss"]) for _, m in steps)
    assert (tmp_path / "ckpt" / "manifest.json").is_file() and result.detector.is_fitted
    assert fit_options(create_detector(cfg), print, tmp_path) == {"log_step": print, "checkpoint_dir": tmp_path}
    patchcore = tiny_config_for("patchcore")
    assert fit_options(create_detector(patchcore), print, tmp_path) == {}
    assert fit_line(patchcore, tiny_line, log_step=lambda *a: steps.append(a)).detector.is_fitted
    assert len(steps) == iterations  # PatchCore reported no steps


def test_evaluate_split(tiny_config: Config, tiny_line: Path) -> None:
    det = fit_line(tiny_config, tiny_line).detector
    split = scan_line(tiny_line)
    calls = []
    result = evaluate_split(det, split, tiny_config, progress=lambda *a: calls.append(a))
    assert len(result.records) == 6 and calls[-1] == ("evaluate", 6, 6)
    assert result.report.overall["image_auroc"] == 1.0
    flat = result.metrics()
    assert flat["image_auroc"] == 1.0 and flat["ms_per_image"] > 0
    assert "square.image_auroc" in flat and "square.aupro" in flat
    op = result.operating_point  # at the model's own threshold, counted from the records themselves
    good = [r.score for r in result.records if r.label == 0]
    bad = [r.score for r in result.records if r.label == 1]
    assert op["overall"]["n_false_rejects"] == sum(s > det.threshold_.image for s in good) == flat["n_false_rejects"]
    assert op["overall"]["n_escapes"] == sum(s <= det.threshold_.image for s in bad) == flat["n_escapes"]
    assert flat["n_good"] == 3 and flat["n_defective"] == 3 and "square.escape_rate_upper" in flat
    assert flat["calibration_frr_upper_bound"] == pytest.approx(det.threshold_.frr_upper_bound)
    masks = [r.mask for r in result.records]
    assert sum(m is not None for m in masks) == 3 and all(m.sum() == 256 for m in masks if m is not None)
    with pytest.raises(ValueError, match="no test images"):
        evaluate_split(det, LineSplit(split.root, split.train, ()), tiny_config)


def test_evaluate_split_latency_excludes_one_off_costs(tiny_config: Config, tiny_line: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """ms_per_image is the steady-state cost of score: a one-off cost on the first call (e.g. the backbone
    graph built per input size) goes into an untimed warm-up call. A fake clock makes it exact."""
    from components import evaluation

    det = fit_line(tiny_config, tiny_line).detector
    clock = [0.0]
    calls: list[int] = []
    real_score = det.score

    def score(images):
        calls.append(len(images))
        clock[0] += (1000.0 if len(calls) == 1 else 0.0) + 0.010 * len(images)  # first call: 1000 s once
        return real_score(images)

    monkeypatch.setattr(det, "score", score)
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock[0])
    result = evaluate_split(det, scan_line(tiny_line), tiny_config)
    assert calls[0] == 1 and sum(calls[1:]) == 6  # one warm-up image, then every test image once
    assert result.ms_per_image == pytest.approx(10.0)


def test_worst_misses() -> None:
    amap = np.zeros((2, 2), np.float32)
    recs = [ScoredSample("g_low", "good", 0, 0.1, amap), ScoredSample("g_high", "good", 0, 0.9, amap),
            ScoredSample("d_low", "x", 1, 0.2, amap), ScoredSample("d_high", "x", 1, 0.95, amap)]
    assert [r.name for r in worst_misses(recs, 0.5, 2)] == ["g_high", "d_low"]
    assert {r.name for r in worst_misses(recs, None, 2)} == {"g_high", "d_low"}  # pivot: the median 0.55
    assert worst_misses(recs, 0.5, 0) == [] and worst_misses([], 0.5, 3) == []


def test_to_uint8_image() -> None:
    image = torch.tensor([[[0.0, 1.0]], [[0.5, 2.0]], [[-1.0, 0.25]]])  # (3, 1, 2)
    out = to_uint8_image(image)
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 128, 0] and out[0, 1].tolist() == [255, 255, 64]
