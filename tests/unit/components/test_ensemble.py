"""The PatchCore backbone ensemble beyond the registry-wide contract (tests/unit/components/test_detector.py): member
scales, the normalised combination, its saved form, member configs and config errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from components.config import ConfigError, validate
from components.detector import create_detector, load_detector
from components.patchcore.ensemble import (
    PatchCoreEnsemble,
    combine_normalised,
    member_config,
    normalising_scale,
)
from tests.conftest import TINY_METHOD_PARAMS, TINY_PARAMS

TRAIN_SEEDS = range(8)
TEST_SEEDS = range(100, 103)


@pytest.fixture(scope="module")
def ensemble(tiny_config_for, textures) -> PatchCoreEnsemble:
    return create_detector(tiny_config_for("patchcore_ensemble")).fit(textures(TRAIN_SEEDS))


def ensemble_raw(**section) -> dict:
    raw = copy.deepcopy(TINY_PARAMS)
    raw["detector"]["method"] = "patchcore_ensemble"
    raw["detector"]["patchcore_ensemble"] = {**copy.deepcopy(TINY_METHOD_PARAMS["patchcore_ensemble"]), **section}
    return raw


def test_scales_are_positive_and_saved(ensemble: PatchCoreEnsemble, tmp_path: Path) -> None:
    assert ensemble.scales_.shape == (2,) and (ensemble.scales_ > 0).all()
    meta = json.loads((ensemble.save(tmp_path / "model") / "metadata.json").read_text())
    members = meta["members"]
    assert [m["backbone"] for m in members] == ["test_resnet", "test_efficientnet"]
    assert [m["scale"] for m in members] == ensemble.scales_.tolist()
    for record, member in zip(members, ensemble.members_, strict=True):
        assert record["bank_size"] == len(member.memory_bank_) > 0
        assert record["weights_sha256"] == member.weights_.sha256 and record["weights_source"] == "random"
        assert record["layers"] == [1, 2]
    assert ensemble.members_[0].weights_.sha256 != ensemble.members_[1].weights_.sha256
    np.testing.assert_array_equal(load_detector(tmp_path / "model").scales_, ensemble.scales_)


def test_scale_is_a_quantile_of_good_to_good_distances() -> None:
    # two "images" of 4 rows each on a line: every nearest other-image distance is 1.0, except 3.0 for row 7
    features = np.array([[0.0], [2.0], [4.0], [6.0], [1.0], [3.0], [5.0], [9.0]], dtype=np.float32)
    assert normalising_scale(features, 4, 0.5) == pytest.approx(1.0)
    assert normalising_scale(features, 4, 1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least two training images"):
        normalising_scale(features[:4], 4, 0.5)
    with pytest.raises(ValueError, match="identical"):
        normalising_scale(np.zeros((8, 2), np.float32), 4, 0.5)


def test_a_strong_member_dominates_nothing() -> None:
    """Hand-built: member A's distances are 1000 times member B's (as a backbone with larger features
    gives). Raw, the mean is A's map; normalised by the scales, each member weighs the same."""
    spot_a = np.zeros((1, 4, 4), np.float32)
    spot_a[0, 0, 0] = 4.0  # A: 4x its normal variation at the top left
    spot_b = np.zeros((1, 4, 4), np.float32)
    spot_b[0, 3, 3] = 4.0  # B: the same excess at the bottom right
    a, b = 1000.0 * (1.0 + spot_a), 1.0 + spot_b
    raw_mean = (a + b) / 2
    assert raw_mean[0, 0, 0] / raw_mean[0, 3, 3] > 4  # unnormalised: B's finding is lost in A's scale
    mean = combine_normalised([a, b], [1000.0, 1.0], "mean")
    assert mean[0, 0, 0] == mean[0, 3, 3] == pytest.approx(3.0)
    assert mean[0, 1, 1] == pytest.approx(1.0)
    peak = combine_normalised([a, b], [1000.0, 1.0], "max")
    assert peak[0, 0, 0] == peak[0, 3, 3] == pytest.approx(5.0) and peak.dtype == np.float32
    scores = combine_normalised([np.array([2000.0, 1000.0]), np.array([1.0, 2.0])], [1000.0, 1.0], "mean")
    np.testing.assert_allclose(scores, [1.5, 1.5])
    with pytest.raises(ValueError, match="combine"):
        combine_normalised([a, b], [1.0, 1.0], "median")


def test_scaling_a_members_features_leaves_the_maps_unchanged(ensemble, tiny_config_for, textures,
                                                              monkeypatch) -> None:
    """The end-to-end version: member 2's embeddings times 1024 (exact in float32) change its raw
    distances and its scale by 1024, and the ensemble's maps not at all."""
    det = create_detector(tiny_config_for("patchcore_ensemble"))
    build = det._new_member

    def louder(backbone: str):
        member = build(backbone)
        if backbone == "test_efficientnet":
            member.extract(textures([0]))  # builds the embedder
            assert member.embedder_.projection is not None
            member.embedder_.projection.mul_(1024.0)
        return member

    monkeypatch.setattr(det, "_new_member", louder)
    det.fit(textures(TRAIN_SEEDS))
    np.testing.assert_allclose(det.scales_, ensemble.scales_ * [1.0, 1024.0], rtol=1e-5)
    images = textures(TEST_SEEDS)
    np.testing.assert_allclose(det.score(images).anomaly_maps, ensemble.score(images).anomaly_maps,
                               rtol=1e-4, atol=1e-6)


def test_save_load_round_trip_gives_identical_scores(ensemble, tmp_path: Path, textures) -> None:
    path = ensemble.save(tmp_path / "model")
    names = sorted(json.loads((path / "manifest.json").read_text())["files"])
    assert "member0.manifest.json" in names and "member1.bank.safetensors" in names
    loaded = load_detector(path)
    assert isinstance(loaded, PatchCoreEnsemble) and loaded.weights_ == ensemble.weights_
    images = textures(TEST_SEEDS)
    before, after = ensemble.score(images), loaded.score(images)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)


def test_member_config() -> None:
    raw = ensemble_raw(layers=[2])
    raw["backbone"]["weights_file"] = "/weights/test_resnet.safetensors"
    cfg = validate(raw)
    own, other = member_config(cfg, "test_resnet"), member_config(cfg, "test_efficientnet")
    assert own.detector.method == other.detector.method == "patchcore"
    assert own.backbone.layers == other.backbone.layers == (2,)
    assert own.backbone.weights_file == Path("/weights/test_resnet.safetensors")
    assert other.backbone.name == "test_efficientnet" and other.backbone.weights_file is None
    assert other.detector.patchcore == cfg.detector.patchcore
    assert member_config(validate(ensemble_raw()), "test_efficientnet").backbone.layers == (1, 2)


@pytest.mark.parametrize(("section", "key"), [
    ({"backbones": ["test_resnet"]}, "detector.patchcore_ensemble.backbones"),
    ({"backbones": ["test_resnet", "test_resnet"]}, "detector.patchcore_ensemble.backbones"),
    ({"combine": "median"}, "detector.patchcore_ensemble.combine"),
    ({"normalise_quantile": 0.0}, "detector.patchcore_ensemble.normalise_quantile"),
    ({"layers": []}, "detector.patchcore_ensemble.layers"),
    ({"weights": "x"}, "detector.patchcore_ensemble.weights"),
])
def test_bad_config_names_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(ensemble_raw(**section))
