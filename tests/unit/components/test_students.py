"""Uninformed Students: each loss on hand-checkable tensors, dense output equal to patch-wise output, the
teacher's data and cache (a second fit reuses it), checkpoint resume, a self-contained saved model.

The registry-wide contract (fit/score/save/load, obvious anomaly) runs in tests/unit/components/test_detector.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import components.detector as detector_module
from components.config import ConfigError
from components.detector import ArtifactError, load_detector
from components.students import teacher as teacher_module
from components.students.config import StudentsConfig
from components.students.detector import Students
from components.students.losses import (
    compactness_loss,
    correlation_matrix,
    distillation_loss,
    predictive_variance,
    regression_error,
    regression_loss,
    triplet_loss,
)
from components.students.networks import (
    PatchNet,
    dense_descriptors,
    dilation_schedule,
    layer_plan,
    pad_for_dense,
    patch_descriptors,
)
from components.students.teacher import natural_images, sample_patch_pool, teacher_digest
from components.students.trainer import crop_positions, crop_span, take_crops
from tests.conftest import TINY_METHOD_PARAMS
from tests.unit._trained import (
    assert_same_weights,
    fit_interrupted_then_resumed,
    logged_steps,
    tiny_method_cfg,
)

TINY_STUDENTS = TINY_METHOD_PARAMS["students"]


def tiny_cfg(root: Path | None = None, **students):
    """conftest's tiny config with method students, `students` overrides, services.root = root."""
    return tiny_method_cfg("students", root, **students)


# ------------------------------------------------------------------------------------------- losses
def test_distillation_loss_is_mean_squared_distance() -> None:
    decoded = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert distillation_loss(decoded, target).item() == pytest.approx((4.0 + 25.0) / 2)
    assert distillation_loss(target, target).item() == 0.0


def test_triplet_loss_uses_the_harder_negative_and_the_margin() -> None:
    a = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])  # d+ = 1
    far = torch.tensor([[10.0, 0.0]])  # |a-n|^2 = 100, |p-n|^2 = 81: far beyond margin
    assert triplet_loss(a, p, far, margin=1.0).item() == 0.0
    n = torch.tensor([[2.0, 0.0]])  # |a-n|^2 = 4, |p-n|^2 = 1 -> d- = 1 (the harder one)
    assert triplet_loss(a, p, n, margin=0.5).item() == pytest.approx(0.5 + 1.0 - 1.0)
    batch = triplet_loss(torch.cat([a, a]), torch.cat([p, p]), torch.cat([far, n]), margin=0.5)
    assert batch.item() == pytest.approx(0.25)  # mean over the batch


def test_compactness_loss_counts_squared_off_diagonal_correlations() -> None:
    x = torch.randn(256, 1, generator=torch.Generator().manual_seed(0))
    duplicated = torch.cat([x, x, -x], dim=1)  # every pair correlated +-1: 6 off-diagonal entries of 1
    assert compactness_loss(duplicated).item() == pytest.approx(6.0, abs=1e-4)
    orthogonal = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # zero-mean, uncorrelated
    assert compactness_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-6)
    corr = correlation_matrix(torch.randn(64, 5, generator=torch.Generator().manual_seed(1)))
    np.testing.assert_allclose(corr.diagonal().numpy(), 1.0, atol=1e-5)


def test_regression_error_and_predictive_variance_match_their_formulas() -> None:
    g = torch.Generator().manual_seed(2)
    students = torch.randn(3, 2, 4, 5, 6, generator=g)  # (M, B, D, H, W)
    target = torch.randn(2, 4, 5, 6, generator=g)
    mu = students.mean(dim=0)
    torch.testing.assert_close(regression_error(students, target), ((mu - target) ** 2).sum(dim=1))
    paper_form = (students ** 2).sum(dim=2).mean(dim=0) - (mu ** 2).sum(dim=1)  # mean |s|^2 - |mean s|^2
    torch.testing.assert_close(predictive_variance(students), paper_form, atol=1e-5, rtol=1e-5)
    same = students[:1].expand(3, -1, -1, -1, -1)
    assert predictive_variance(same).abs().max().item() < 1e-12  # identical students: no variance
    assert regression_loss(students[0], students[0]).item() == 0.0
    assert regression_loss(torch.zeros(1, 2, 1, 2), torch.ones(1, 2, 1, 2)).item() == pytest.approx(2.0)


# ------------------------------------------------------------------------------------ dense = patch
@pytest.mark.parametrize("patch_size", [3, 9, 17, 33, 65])
def test_dilation_schedule_gives_exactly_the_patch_size(patch_size: int) -> None:
    dilations = dilation_schedule(patch_size)
    assert 1 + 2 * sum(dilations) == patch_size
    reach = 1
    for d in dilations:
        assert d <= reach  # no gridding holes
        reach += 2 * d
    assert dilation_schedule(17) == [1, 2, 4, 1] and dilation_schedule(65) == [1, 2, 4, 8, 16, 1]
    with pytest.raises(ValueError, match="odd"):
        dilation_schedule(16)


@pytest.mark.parametrize("patch_size", [9, 17])
def test_dense_output_equals_patch_wise_output(patch_size: int) -> None:
    torch.manual_seed(patch_size)
    net = PatchNet(patch_size, channels=8, descriptor_dim=6, leaky_slope=0.005).eval()
    images = torch.rand(2, 3, 30, 34)
    with torch.no_grad():
        dense = dense_descriptors(net, images)
        assert dense.shape == (2, 6, 30, 34)
        g = torch.Generator().manual_seed(0)
        positions = [(0, 0), (29, 33), (0, 33), (15, 2)] + \
            [tuple(int(v) for v in (torch.randint(30, (1,), generator=g), torch.randint(34, (1,), generator=g)))
             for _ in range(12)]
        patched = patch_descriptors(net, images, positions)  # (B, P, D)
    for k, (r, c) in enumerate(positions):
        torch.testing.assert_close(dense[:, :, r, c], patched[:, k], atol=1e-5, rtol=1e-5)


def test_dense_output_depends_only_on_its_patch() -> None:
    torch.manual_seed(0)
    net = PatchNet(9, channels=8, descriptor_dim=4, leaky_slope=0.005).eval()
    images = torch.rand(1, 3, 32, 32)
    changed = images.clone()
    changed[:, :, 20:, :] = torch.rand(1, 3, 12, 32)  # rows >= 20 only
    with torch.no_grad():
        a, b = dense_descriptors(net, images), dense_descriptors(net, changed)
    torch.testing.assert_close(a[..., :16, :], b[..., :16, :], atol=0, rtol=0)  # rows <= 15 see rows <= 19
    assert not torch.allclose(a[..., 16, :], b[..., 16, :])  # row 16's patch reaches row 20
    with pytest.raises(ValueError, match="too small for patch size 65"):
        pad_for_dense(torch.rand(1, 3, 20, 20), 65)


def test_crops_cover_exactly_the_pixels_they_train() -> None:
    torch.manual_seed(0)
    net = PatchNet(9, channels=4, descriptor_dim=3, leaky_slope=0.005).eval()
    images = torch.rand(3, 3, 40, 36)
    positions = crop_positions(5, 3, 40, 36, 16, 2, seed=7)
    torch.testing.assert_close(positions, crop_positions(5, 3, 40, 36, 16, 2, seed=7))
    with torch.no_grad():
        out = net(take_crops(pad_for_dense(images, 9), positions, 16, 9))
        dense = dense_descriptors(net, images)
    for k, (i, t, c) in enumerate(positions.tolist()):
        torch.testing.assert_close(out[k], dense[i, :, t:t + 16, c:c + 16], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patch_size", [9, 17, 33, 65])
def test_stride_two_plan_keeps_exactly_the_patch_size(patch_size: int) -> None:
    plan = layer_plan(patch_size, 2)
    assert plan[:2] == [(1, 1), (1, 2)] and all(s == 1 for _, s in plan[2:])
    reach, step = 1, 1  # receptive field and spacing of the current layer's outputs, in input pixels
    for d, s in plan:
        assert d * step <= reach  # no gridding holes
        reach += 2 * d * step
        step *= s
    assert reach == patch_size
    assert layer_plan(17, 2) == [(1, 1), (1, 2), (1, 1), (2, 1)]
    assert layer_plan(17, 1) == [(d, 1) for d in dilation_schedule(17)]
    for bad in (5, 11, 15):
        with pytest.raises(ValueError, match="1 \\(mod 4\\)"):
            layer_plan(bad, 2)
    with pytest.raises(ValueError, match="1 \\(mod 4\\)"):
        StudentsConfig(patch_sizes=[17, 31])


@pytest.mark.parametrize(("patch_size", "height", "width"), [(9, 30, 34), (17, 31, 24)])
def test_stride_two_dense_output_is_the_patch_wise_output_at_every_other_pixel(patch_size: int, height: int,
                                                                             width: int) -> None:
    torch.manual_seed(patch_size)
    net = PatchNet(patch_size, channels=8, descriptor_dim=6, leaky_slope=0.005, stride=2).eval()
    images = torch.rand(2, 3, height, width)
    with torch.no_grad():
        dense = dense_descriptors(net, images)
        assert dense.shape == (2, 6, (height + 1) // 2, (width + 1) // 2)
        positions = [(2 * i, 2 * j) for i in range(dense.shape[2]) for j in range(dense.shape[3])]
        patched = patch_descriptors(net, images, positions)
    for k, (r, c) in enumerate(positions):
        torch.testing.assert_close(dense[:, :, r // 2, c // 2], patched[:, k], atol=1e-5, rtol=1e-5)


def test_stride_two_crops_train_the_descriptors_scoring_uses() -> None:
    torch.manual_seed(0)
    net = PatchNet(9, channels=4, descriptor_dim=3, leaky_slope=0.005, stride=2).eval()
    images = torch.rand(3, 3, 40, 36)
    crop = 8
    span = crop_span(crop, 2)
    assert span == 15
    positions = crop_positions(5, 3, 40, 36, span, 4, seed=7)
    positions[0, 1:] = torch.tensor([2, 4])  # one crop on the scoring grid (even top and left)
    with torch.no_grad():
        out = net(take_crops(pad_for_dense(images, 9), positions, crop, 9, stride=2))
        assert out.shape == (4, 3, crop, crop)
        i, t, c = positions[0].tolist()
        dense = dense_descriptors(net, images)
        torch.testing.assert_close(out[0], dense[i, :, t // 2:t // 2 + crop, c // 2:c // 2 + crop], atol=1e-5,
                                   rtol=1e-5)
        for k, (i, t, c) in enumerate(positions.tolist()):  # any crop: the patch-wise descriptors it spans
            ref = patch_descriptors(net, images[i:i + 1], [(t + 2 * a, c + 2 * b) for a in (0, crop - 1)
                                                           for b in (0, crop - 1)])[0]
            got = torch.stack([out[k, :, a, b] for a in (0, crop - 1) for b in (0, crop - 1)])
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_model_saved_before_dense_stride_loads_with_stride_one(tmp_path: Path, textures) -> None:
    det = Students(tiny_cfg(dense_stride=1)).fit(textures(range(4)))
    path = det.save(tmp_path / "model")
    meta = json.loads((path / "metadata.json").read_text())
    del meta["config"]["detector"]["students"]["dense_stride"]  # as written before the field existed
    (path / "metadata.json").write_text(json.dumps(meta))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["metadata.json"] = {"sha256": hashlib.sha256((path / "metadata.json").read_bytes()).hexdigest(),
                                          "size": (path / "metadata.json").stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_detector(path)
    assert loaded.params.dense_stride == 1 and Students(tiny_cfg()).params.dense_stride == 2
    good = textures([100])
    np.testing.assert_array_equal(loaded.score(good).anomaly_maps, det.score(good).anomaly_maps)


def test_stride_two_scores_maps_at_the_input_size(textures) -> None:
    det = Students(tiny_cfg()).fit(textures(range(4)))
    assert det.params.dense_stride == 2 and det.net_.teacher["p9"].stride == 2
    out = det.score(textures([100, 101]))
    assert out.anomaly_maps.shape == (2, 64, 64) and np.isfinite(out.anomaly_maps).all()


# ------------------------------------------------------------------------------------------ teacher
def test_natural_images_and_patch_pool() -> None:
    images = natural_images()
    assert len(images) == len(teacher_module.NATURAL_IMAGES) >= 10
    assert all(im.shape[0] == 3 and im.min() >= 0 and im.max() <= 1 for im in images)
    anchors, positives = sample_patch_pool(images, 9, 20, shift=0, noise=0.0,
                                           generator=torch.Generator().manual_seed(0))
    assert anchors.shape == positives.shape == (20, 3, 9, 9)
    torch.testing.assert_close(anchors, positives)  # no shift, no noise: the positive is the anchor
    a2, p2 = sample_patch_pool(images, 9, 20, shift=2, noise=0.05, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a2, p2) and (a2 - p2).abs().mean() < 0.5


def test_teacher_training_lowers_its_loss() -> None:
    params = StudentsConfig(**{**TINY_STUDENTS, "teacher_iterations": 40})
    images = natural_images()[:4]
    g = torch.Generator().manual_seed(0)
    anchors, positives = sample_patch_pool(images, 9, 64, 1, 0.02, g)
    targets = torch.randn(64, 12, generator=g)
    torch.manual_seed(0)
    net = PatchNet(9, params.channels, params.descriptor_dim, params.leaky_slope)
    before = teacher_module.train_scale(net, anchors, positives, targets,
                                        params.model_copy(update={"teacher_iterations": 1}),
                                        torch.device("cpu"), torch.Generator().manual_seed(1))
    after = teacher_module.train_scale(net, anchors, positives, targets, params, torch.device("cpu"),
                                       torch.Generator().manual_seed(1))
    assert after["loss"] < before["loss"], (before, after)
    assert after["distill"] < before["distill"]


def test_second_fit_reuses_the_cached_teacher(tmp_path: Path, textures, monkeypatch) -> None:
    cfg = tiny_cfg(tmp_path / "services", teacher_cache=True)
    first = Students(cfg).fit(textures(range(6)))
    assert first.fit_stats_["teacher_reused"] == 0.0
    cached = list((tmp_path / "services" / "teachers").iterdir())
    assert [p.name for p in cached] == [first.teacher_desc_["digest"]]
    assert (cached[0] / "teacher.safetensors").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(teacher_module, "train_teacher", no_training)
    second = Students(cfg).fit(textures(range(6)))
    assert second.fit_stats_["teacher_reused"] == 1.0
    assert_same_weights(first.net_.teacher, second.net_.teacher)
    good = textures([100, 101])
    np.testing.assert_array_equal(first.score(good).anomaly_maps, second.score(good).anomaly_maps)
    with pytest.raises(AssertionError, match="trained again"):  # another teacher setting: another digest
        Students(tiny_cfg(tmp_path / "services", teacher_cache=True, triplet_margin=2.0)).fit(textures(range(6)))


def test_teacher_digest_tracks_teacher_settings_and_weights_only() -> None:
    base = StudentsConfig()
    key = teacher_digest(base, "mobilenetv2_100", "a" * 64)
    assert key == teacher_digest(base.model_copy(update={"num_students": 5, "iterations": 7}), "mobilenetv2_100",
                                 "a" * 64)
    assert key != teacher_digest(base.model_copy(update={"channels": 16}), "mobilenetv2_100", "a" * 64)
    assert key != teacher_digest(base, "mobilenetv2_100", "b" * 64)
    assert key != teacher_digest(base, "tf_efficientnet_lite0", "a" * 64)


# ------------------------------------------------------------------------------- fit, resume, save
def test_fit_callbacks_and_saved_model_is_self_contained(tmp_path: Path, textures) -> None:
    logged, bars = [], []
    det = Students(tiny_cfg(tmp_path / "services", teacher_cache=True, patch_sizes=[5, 9], iterations=4,
                                dense_stride=1))
    det.fit(textures(range(4)), progress=lambda *a: bars.append(a), log_step=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [1, 2, 3, 4] and set(logged[0][1]) == {"loss", "loss_p5", "loss_p9"}
    assert bars[-1] == ("train", 4, 4) and ("teacher", 16, 16) in bars
    path = det.save(tmp_path / "model")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["teacher"]["digest"] == det.teacher_desc_["digest"]
    assert meta["teacher"]["weights_sha256"] == det.weights_.sha256 and det.weights_.source == "random"
    assert {"teacher.safetensors", "students.safetensors", "metadata.json"} <= {p.name for p in path.iterdir()}
    shutil.rmtree(tmp_path / "services")  # no cache left: the model must carry its teacher
    loaded = load_detector(path)
    assert loaded.weights_ == det.weights_
    good = textures([100])
    np.testing.assert_array_equal(loaded.score(good).anomaly_maps, det.score(good).anomaly_maps)


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path, textures) -> None:
    cfg = tiny_cfg(checkpoint_every=2, iterations=6)
    images = textures(range(6))
    full = Students(cfg).fit(images)
    resumed, steps, left = fit_interrupted_then_resumed(lambda: Students(cfg), images, tmp_path / "ckpt")
    assert left == 2 and steps == [3, 4, 5, 6] and resumed.fit_stats_["resumed_from_step"] == 2
    assert_same_weights(full.net_, resumed.net_)
    good = textures([100, 101])
    np.testing.assert_array_equal(full.score(good).anomaly_maps, resumed.score(good).anomaly_maps)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path: Path, textures) -> None:
    ckpt = tmp_path / "ckpt"
    Students(tiny_cfg(checkpoint_every=3, iterations=3)).fit(textures(range(4)), checkpoint_dir=ckpt)
    assert logged_steps(Students(tiny_cfg(checkpoint_every=3, iterations=3, lr=1e-4)), textures(range(4)),
                        checkpoint_dir=ckpt) == [1, 2, 3]
    model = Students(tiny_cfg(iterations=2)).fit(textures(range(4))).save(tmp_path / "model")
    with pytest.raises(ArtifactError, match="not a students checkpoint"):
        Students(tiny_cfg()).fit(textures(range(4)), checkpoint_dir=model)


def test_load_refuses_a_model_whose_students_do_not_fit(tmp_path: Path, textures, monkeypatch) -> None:
    path = Students(tiny_cfg(iterations=2)).fit(textures(range(4))).save(tmp_path / "model")
    meta = json.loads((path / "metadata.json").read_text())
    meta["config"]["detector"]["students"]["num_students"] = 3
    (path / "metadata.json").write_text(json.dumps(meta))
    monkeypatch.setattr(detector_module, "read_saved_model",
                        lambda d, m, n: ({p.name: p for p in Path(d).iterdir()}, meta))
    with pytest.raises(ArtifactError, match="students.safetensors: does not fit"):
        Students.load(path)


def test_config_validation() -> None:
    for bad, message in (({"patch_sizes": [16]}, "odd"), ({"patch_sizes": [33, 17]}, "increasing"),
                         ({"patch_sizes": []}, "at least one"), ({"num_students": 1}, "num_students")):
        with pytest.raises(ConfigError, match=message):
            tiny_cfg(**bad)
    assert StudentsConfig().num_students == 3 and StudentsConfig().descriptor_dim == 128


def test_a_damaged_cached_teacher_is_trained_again(tmp_path: Path, textures) -> None:
    cfg = tiny_cfg(tmp_path / "services", teacher_cache=True, iterations=2)
    first = Students(cfg).fit(textures(range(4)))
    weights = tmp_path / "services" / "teachers" / first.teacher_desc_["digest"] / "teacher.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    weights.write_bytes(bytes(damaged))
    again = Students(cfg).fit(textures(range(4)))
    assert again.fit_stats_["teacher_reused"] == 0.0
    assert Students(cfg).fit(textures(range(4))).fit_stats_["teacher_reused"] == 1.0  # the cache was repaired
    assert_same_weights(first.net_.teacher, again.net_.teacher)  # teacher training is deterministic


# ------------------------------------------------------------------------- issue 18: options beside defaults
def test_paper_compactness_sums_the_off_diagonal_correlations() -> None:
    x = torch.randn(256, 1, generator=torch.Generator().manual_seed(0))
    signed = torch.cat([x, x, -x], dim=1)  # c01 = 1, c02 = c12 = -1: 2 * (1 - 1 - 1) = -2
    assert compactness_loss(signed, "sum").item() == pytest.approx(-2.0, abs=1e-4)
    assert compactness_loss(signed, "squared").item() == pytest.approx(6.0, abs=1e-4)
    assert compactness_loss(signed).item() == compactness_loss(signed, "squared").item()  # the default
    same = torch.cat([x, x], dim=1)
    assert compactness_loss(same, "sum").item() == pytest.approx(2.0, abs=1e-4)
    with pytest.raises(ValueError, match="expected"):
        compactness_loss(same, "abs")


def test_teacher_source_images_and_cache_key(tmp_path: Path) -> None:
    from PIL import Image

    base = StudentsConfig()
    key = teacher_digest(base, "m", "a" * 64)
    # defaults unchanged: the skimage source adds nothing to the key (caches from before stay valid)
    assert teacher_module.source_key(base, None) is None
    assert "teacher_source" not in base.teacher_fields()
    # fields added later enter the key only when they differ from what teachers were built with before them:
    # the paper's compactness (today's default) and stride 2 do; squared compactness at stride 1 does not
    assert base.teacher_fields()["compactness"] == "sum" and base.teacher_fields()["dense_stride"] == 2
    legacy = base.model_copy(update={"compactness": "squared", "dense_stride": 1})
    assert "compactness" not in legacy.teacher_fields() and "dense_stride" not in legacy.teacher_fields()
    line = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    own = base.model_copy(update={"teacher_source": "line"})
    images = teacher_module.teacher_images(own, line)
    assert len(images) == 3 and torch.equal(images[0], line[0])
    k_line = teacher_digest(own, "m", "a" * 64, teacher_module.source_key(own, line))
    k_other = teacher_digest(own, "m", "a" * 64, teacher_module.source_key(own, line.flip(-1)))
    assert len({key, k_line, k_other}) == 3  # keyed by the source and by the line's images
    with pytest.raises(ValueError, match="needs the line"):
        teacher_module.teacher_images(own, None)
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((30, 20, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png")
    folder = base.model_copy(update={"teacher_source": "folder", "teacher_folder": tmp_path})
    assert [im.shape for im in teacher_module.teacher_images(folder, None)] == [(3, 30, 20)] * 2
    mix = base.model_copy(update={"teacher_source": "mix", "teacher_folder": tmp_path})
    assert len(teacher_module.teacher_images(mix, line)) == len(teacher_module.NATURAL_IMAGES) + 3 + 2
    k_folder = teacher_digest(folder, "m", "a" * 64, teacher_module.source_key(folder, None))
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tmp_path / "1.png")  # a changed image: a new key
    assert k_folder != teacher_digest(folder, "m", "a" * 64, teacher_module.source_key(folder, None))
    with pytest.raises(ValueError, match="teacher_folder"):
        StudentsConfig(teacher_source="folder")


def test_line_teacher_fit_with_the_paper_compactness_and_three_scales(tmp_path: Path, textures) -> None:
    cfg = tiny_cfg(tmp_path / "services", teacher_cache=True, teacher_source="line", compactness="sum",
                   patch_sizes=[5, 9, 17], dense_stride=1)
    det = Students(cfg).fit(textures(range(6)))
    assert det.teacher_desc_["source"] == "line" and det.fit_stats_["teacher_reused"] == 0.0
    assert set(det.net_.teacher.keys()) == {"p5", "p9", "p17"}
    again = Students(cfg).fit(textures(range(6)))
    assert again.fit_stats_["teacher_reused"] == 1.0
    other = Students(cfg).fit(textures(range(1, 7)))  # other good images: another teacher
    assert other.fit_stats_["teacher_reused"] == 0.0
    loaded = load_detector(det.save(tmp_path / "model"))
    good = textures([100, 101])
    np.testing.assert_array_equal(loaded.score(good).anomaly_maps, det.score(good).anomaly_maps)


def test_working_size_scores_at_that_side_and_returns_input_sized_maps(textures) -> None:
    det = Students(tiny_cfg(image_size=32)).fit(textures(range(4)))
    assert det.working(torch.rand(1, 3, 64, 64)).shape == (1, 3, 32, 32)
    out = det.score(textures([100, 101]))  # 64 px in, 32 px inside, 64 px maps out
    assert out.anomaly_maps.shape == (2, 64, 64) and np.isfinite(out.anomaly_maps).all()
    full = Students(tiny_cfg()).fit(textures(range(4)))  # the default, 0: the input's own size
    assert full.working(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
