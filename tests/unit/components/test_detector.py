"""The Detector contract, checked for every registered method (a new method is tested by registering it).

Each method is fitted on 8 seeded noise textures with the tiny random backbone of `tiny_config`, then must
score a bright square higher than any good texture, round-trip through save/load bit for bit, refuse a
tampered file, and leave nothing behind when a save fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import components.detector as detector_module
from components import thresholds
from components.detector import (
    MANIFEST,
    ArtifactError,
    Detector,
    NotFittedError,
    ScoreBatch,
    create_detector,
    detector_class,
    load_detector,
    registered_detectors,
)

METHODS = registered_detectors()
TRAIN_SEEDS = range(8)
GOOD_SEEDS = range(100, 106)
DEFECT_SEEDS = range(200, 206)


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, tiny_config_for, textures) -> tuple[Detector, ScoreBatch, ScoreBatch]:
    """(detector fitted on the train textures, scores of good test textures, scores of defective ones)."""
    det = create_detector(tiny_config_for(request.param))
    assert det.fit(textures(TRAIN_SEEDS)) is det
    return det, det.score(textures(GOOD_SEEDS)), det.score(textures(DEFECT_SEEDS, defect=True))


def test_registry_has_patchcore() -> None:
    assert "patchcore" in METHODS
    with pytest.raises(ValueError, match="unknown detector 'nope'"):
        detector_class("nope")


@pytest.mark.parametrize("method", METHODS)
def test_init_stores_configuration_only(method: str, tiny_config_for, textures) -> None:
    det = create_detector(tiny_config_for(method))
    assert isinstance(det, Detector)
    assert det.name == method
    assert not det.is_fitted
    with pytest.raises(NotFittedError, match="fit"):
        det.score(textures([0]))


@pytest.mark.parametrize("method", METHODS)
def test_save_before_fit_raises(method: str, tiny_config_for, tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        create_detector(tiny_config_for(method)).save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_score_shapes(fitted, textures) -> None:
    det, good, _ = fitted
    assert good.image_scores.shape == (6,)
    assert good.anomaly_maps.shape == (6, 64, 64)
    assert good.image_scores.dtype == np.float32 and good.anomaly_maps.dtype == np.float32
    assert np.isfinite(good.anomaly_maps).all() and np.isfinite(good.image_scores).all()
    one = det.score(textures([100]))
    assert one.image_scores.shape == (1,) and one.anomaly_maps.shape == (1, 64, 64)
    np.testing.assert_allclose(one.image_scores, good.image_scores[:1], rtol=1e-5)


def test_obvious_anomaly_scores_higher(fitted) -> None:
    _det, good, bad = fitted
    # every defective image above every good one, by a margin (measured: >= 2.5x for 20 inits)
    assert bad.image_scores.min() > 1.5 * good.image_scores.max(), (good.image_scores, bad.image_scores)


def test_anomaly_map_points_at_the_square(fitted) -> None:
    _det, good, bad = fitted
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:36, 24:40] = True  # conftest.SQUARE
    inside = bad.anomaly_maps[:, mask].mean(axis=1)
    outside = bad.anomaly_maps[:, ~mask].mean(axis=1)
    assert (inside > 1.5 * outside).all(), (inside, outside)
    # the hottest pixel of each defective map lies on (or next to) the square
    for amap in bad.anomaly_maps:
        r, c = np.unravel_index(amap.argmax(), amap.shape)
        assert 16 <= r < 40 and 20 <= c < 44, (r, c)
    assert bad.anomaly_maps.max() > good.anomaly_maps.max()


def test_fit_accepts_batches_and_is_deterministic(fitted, textures, tmp_path: Path) -> None:
    det, good, _ = fitted
    images = textures(TRAIN_SEEDS)
    again = create_detector(det.cfg).fit(iter([images[:3], images[3:6], images[6:]]))
    np.testing.assert_array_equal(again.score(textures(GOOD_SEEDS)).image_scores, good.image_scores)
    # identical fits save identical folders (no timings or run facts in metadata.json): the object store's
    # content addressing then reuses the first upload for a rerun
    first, second = det.save(tmp_path / "a"), again.save(tmp_path / "b")
    assert json.loads((first / MANIFEST).read_text()) == json.loads((second / MANIFEST).read_text())
    saved = json.loads((first / "metadata.json").read_text())["fit_stats"]
    assert not [k for k in saved if k.endswith("_s")] and any(k.endswith("_s") for k in det.fit_stats_)


def test_save_load_round_trip(fitted, tmp_path: Path, textures) -> None:
    det, good, bad = fitted
    det.threshold_ = thresholds.calibrate(good.image_scores, good.anomaly_maps, 0.1)
    try:
        path = det.save(tmp_path / "model")
    finally:
        det.threshold_ = None
    assert path == tmp_path / "model"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["method"] == det.name
    assert set(manifest["files"]) <= {p.name for p in path.iterdir()}
    for loaded in (load_detector(path), type(det).load(path)):
        assert type(loaded) is type(det) and loaded.is_fitted
        assert loaded.cfg == det.cfg
        again_good = loaded.score(textures(GOOD_SEEDS))
        again_bad = loaded.score(textures(DEFECT_SEEDS, defect=True))
        np.testing.assert_array_equal(again_good.image_scores, good.image_scores)
        np.testing.assert_array_equal(again_good.anomaly_maps, good.anomaly_maps)
        np.testing.assert_array_equal(again_bad.image_scores, bad.image_scores)
        assert loaded.threshold_ is not None
        assert loaded.threshold_.to_dict() == thresholds.calibrate(
            good.image_scores, good.anomaly_maps, 0.1).to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_every_file_is_checked_on_load(fitted, tmp_path: Path) -> None:
    det, _, _ = fitted
    path = det.save(tmp_path / "model")
    names = sorted(json.loads((path / MANIFEST).read_text())["files"])
    assert any("bank" in n for n in names) or det.name != "patchcore"
    for name in names:
        target = path / name
        original = target.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        target.write_bytes(bytes(flipped))
        with pytest.raises(ArtifactError, match=rf"{name}: sha256 mismatch"):
            load_detector(path)
        target.write_bytes(original)
    load_detector(path)  # restored: loads again
    (path / names[0]).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_detector(path)


def test_missing_or_foreign_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_detector(tmp_path / "nothing")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a defectops manifest"):
        load_detector(tmp_path / "m")
    (tmp_path / "m" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        load_detector(tmp_path / "m")


def test_nothing_left_behind_when_save_fails_midway(fitted, tmp_path: Path, monkeypatch) -> None:
    det, _, _ = fitted
    real = detector_module.sha256_file
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # after the first file is written and hashed, the second write is done
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(detector_module, "sha256_file", failing)
    with pytest.raises(OSError, match="No space"):
        det.save(tmp_path / "model")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_model(fitted, tmp_path: Path, monkeypatch, textures) -> None:
    det, good, _ = fitted
    path = det.save(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(detector_module, "sha256_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        det.save(path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    np.testing.assert_array_equal(load_detector(path).score(textures(GOOD_SEEDS)).image_scores, good.image_scores)


def test_save_replaces_a_model_but_never_a_user_folder(fitted, tmp_path: Path) -> None:
    det, _, _ = fitted
    path = det.save(tmp_path / "model")
    os.makedirs(tmp_path / ".model.old")  # debris of an interrupted earlier save
    (tmp_path / ".model.old" / "x").write_text("x")
    det.save(path)  # replacing a saved model is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    load_detector(path)
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ArtifactError, match=f"{user}: folder is not empty and holds no saved model"):
        det.save(user)
    assert (user / "holiday.jpg").read_bytes() == b"precious"
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    with pytest.raises(ArtifactError, match="not a folder"):
        det.save(a_file)
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    load_detector(det.save(empty))


def test_score_rejects_bad_input(fitted) -> None:
    det, _, _ = fitted
    with pytest.raises(ValueError):
        det.score(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError):
        det.score(torch.rand(64, 64))


def test_scorebatch_validation_and_concat() -> None:
    a = ScoreBatch(np.zeros(2, np.float32), np.zeros((2, 4, 4), np.float32))
    b = ScoreBatch(np.ones(1, np.float32), np.ones((1, 4, 4), np.float32))
    both = ScoreBatch.concat([a, b])
    assert both.image_scores.tolist() == [0, 0, 1] and both.anomaly_maps.shape == (3, 4, 4)
    assert ScoreBatch.concat([]).image_scores.shape == (0,)
    with pytest.raises(ValueError, match="disagree"):
        ScoreBatch(np.zeros(2), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="needs"):
        ScoreBatch(np.zeros((2, 1)), np.zeros((2, 4, 4)))
