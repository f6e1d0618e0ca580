"""Transformaly: the Gaussian NLL against scipy, PCA's kept variance, the distillation loss and its gradient,
student initialisation, shapes through a tiny random ViT and the CNN variant, checkpoint resume, save/load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import components.transformaly.detector  # noqa: F401  (registers "transformaly")
from components.backbones import WeightsError
from components.config import BackboneConfig, ConfigError
from components.detector import ArtifactError, NotFittedError, create_detector, load_detector
from components.transformaly.config import TransformalyConfig
from components.transformaly.detector import Transformaly
from components.transformaly.encoders import build_teacher
from components.transformaly.gaussian import fit_gaussian, fit_pca, gaussian_nll
from components.transformaly.loss import block_discrepancy, distillation_loss, location_errors
from components.transformaly.model import TransformalyNet, init_student
from tests.unit._trained import (
    assert_same_weights,
    fit_interrupted_then_resumed,
    logged_steps,
    tiny_method_cfg,
)

TINY_VIT = {"encoder": "vit", "vit_name": "test_vit", "vit_weights": "random", "vit_blocks": [3, 4, 5]}


def tiny_cfg(**transformaly):
    """conftest's tiny config (random test_resnet, 64 px) with method transformaly and section overrides."""
    return tiny_method_cfg("transformaly", **transformaly)


def tiny_net(student_init: str = "random", init_noise: float = 0.0, **section) -> TransformalyNet:
    params = tiny_cfg(**section).detector.transformaly
    teacher, _, _ = build_teacher(params, tiny_cfg().backbone)
    return TransformalyNet(teacher, params.blocks, student_init, init_noise, seed=0)


# ------------------------------------------------------------------------------------ Gaussian and PCA
def test_gaussian_nll_equals_scipy_logpdf() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4)) + 3.0
    g = fit_gaussian(x, ridge=1e-3)
    queries = rng.normal(size=(7, 4)) * 2.0
    expected = -multivariate_normal(mean=x.mean(axis=0), cov=g.cov).logpdf(queries)
    np.testing.assert_allclose(gaussian_nll(g, queries), expected, rtol=1e-10, atol=1e-10)
    # the ridge is relative to the mean variance: cov = sample cov + (ridge + 1e-12) * trace / D * I
    sample = np.cov(x, rowvar=False)
    np.testing.assert_allclose(g.cov - sample, (1e-3 + 1e-12) * np.trace(sample) / 4 * np.eye(4), rtol=1e-9)
    # farther from the mean: larger NLL
    assert gaussian_nll(g, x.mean(axis=0, keepdims=True) + 10)[0] > gaussian_nll(g, x.mean(axis=0, keepdims=True))[0]


def test_gaussian_refuses_too_few_or_constant_features() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_gaussian(np.ones((1, 3)), 1e-6)
    g = fit_gaussian(np.ones((5, 3)), 0.0)  # no variance at all: the absolute floor keeps it finite
    assert np.isfinite(gaussian_nll(g, np.ones((1, 3)))).all()
    with pytest.raises(ValueError, match="zero variance"):
        fit_pca(np.ones((5, 3)), 0.9)


@pytest.mark.parametrize("variance", [0.5, 0.9, 0.99])
def test_pca_keeps_at_least_the_asked_variance_with_the_fewest_components(variance: float) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 12)) * np.geomspace(10, 0.1, 12)  # decreasing variances
    pca = fit_pca(x, variance)
    kept = np.var(pca.transform(x), axis=0).sum() / np.var(x - x.mean(axis=0), axis=0).sum()
    assert kept >= variance - 1e-9 and pca.explained.sum() == pytest.approx(kept)
    k = len(pca.explained)
    assert k == 1 or fit_pca(x, variance).explained[: k - 1].sum() < variance  # one fewer would not do
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(k), atol=1e-10)


# ------------------------------------------------------------------------------------------ the loss
def test_distillation_loss_is_zero_for_equal_outputs_and_has_a_gradient_otherwise() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, 8, 4, 4), torch.randn(2, 5, 16)]
    student = [t.clone().requires_grad_(True) for t in teacher]
    loss, per_block = distillation_loss(teacher, student)
    assert loss.item() == 0.0 and per_block.tolist() == [0.0, 0.0]
    loss.backward()
    assert all(float(s.grad.abs().max()) == 0.0 for s in student)
    moved = [(t + 0.1 * torch.randn_like(t)).requires_grad_(True) for t in teacher]
    loss, per_block = distillation_loss(teacher, moved)
    assert loss.item() > 0 and (per_block > 0).all()
    loss.backward()
    assert all(float(s.grad.abs().max()) > 0 for s in moved)
    # the mean of the per-block MSEs; gradient 2 (S - T) / numel / n_blocks
    expected = sum(((s - t) ** 2).mean() for s, t in zip(moved, teacher, strict=True)) / 2
    assert loss.item() == pytest.approx(expected.item())
    torch.testing.assert_close(moved[0].grad, (2 * (moved[0] - teacher[0]) / teacher[0].numel() / 2).detach())


def test_discrepancy_and_location_errors_agree() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    tokens_t, tokens_s = torch.randn(3, 17, 6), torch.randn(3, 17, 6)
    assert location_errors(t, s).shape == (3, 4, 4) and location_errors(tokens_t, tokens_s).shape == (3, 17)
    disc = block_discrepancy([t, tokens_t], [s, tokens_s])
    assert disc.shape == (3, 2)
    torch.testing.assert_close(disc[:, 0], ((s - t) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(disc[:, 1], ((tokens_s - tokens_t) ** 2).mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="differ"):
        location_errors(t, s[:, :4])


# ------------------------------------------------------------------------------------ students, model
def test_copied_student_starts_equal_to_the_teacher(textures) -> None:
    net = tiny_net("copy", 0.0)
    for b, student in zip(net.block_ids, net.student, strict=True):
        teacher_block = net.teacher.blocks()[b]
        for (name, a), (_, c) in zip(teacher_block.state_dict().items(), student.state_dict().items(), strict=True):
            assert torch.equal(a, c), name
        assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in net.teacher.parameters())
    features = net(textures(range(2)))
    loss, _ = distillation_loss(features.teacher, features.student)
    assert loss.item() == 0.0  # hence the config refuses copy with init_noise 0 (nothing to learn)
    with pytest.raises(ConfigError, match="no-op"):
        tiny_cfg(student_init="copy", init_noise=0.0)


def test_noisy_copy_and_random_students_differ_and_are_seeded(textures) -> None:
    images = textures(range(2))
    for mode, noise in (("copy", 0.1), ("random", 0.0)):
        a, b = tiny_net(mode, noise), tiny_net(mode, noise)
        fa, fb = a(images), b(images)
        assert distillation_loss(fa.teacher, fa.student)[0].item() > 0
        for x, y in zip(fa.student, fb.student, strict=True):
            assert torch.equal(x, y)  # same seed, same student
    block = tiny_net().teacher.blocks()[1]
    one, two = (init_student(block, "random", 0.0, seed).state_dict() for seed in (1, 2))
    assert any(not torch.equal(one[k], two[k]) for k in one if one[k].is_floating_point())


def test_students_see_the_teachers_input_to_their_block(textures) -> None:
    net = tiny_net()
    images = textures(range(2))
    passed = net.teacher_pass(images)
    blocks = net.teacher.blocks()
    x = net.teacher.stem(images)
    for index in range(net.block_ids[0]):
        x = blocks[index](x)
    torch.testing.assert_close(passed.first_input, x)
    for k, b in enumerate(net.block_ids):
        torch.testing.assert_close(passed.student_inputs()[k], x)
        x = blocks[b](x)
        torch.testing.assert_close(passed.outputs[k], x)
    assert passed.pooled.shape == (2, 96)  # test_resnet's pooled layer4


def test_shapes_through_a_tiny_random_vit(textures) -> None:
    det = Transformaly(tiny_cfg(**TINY_VIT, epochs=1)).fit(textures(range(4)))
    assert det.label == "transformaly" and det.net_.teacher.kind == "vit"
    out = det.score(textures([100, 101]))
    assert out.image_scores.shape == (2,) and out.anomaly_maps.shape == (2, 64, 64)
    assert np.isfinite(out.anomaly_maps).all() and np.isfinite(out.image_scores).all()
    features = det.net_(textures([100]))
    assert [f.shape for f in features.teacher] == [(1, 1 + 16, 64)] * 3  # CLS + 4 x 4 patches
    assert features.pooled.shape == (1, 64)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="consecutive"):
        tiny_cfg(cnn_blocks=[1, 3])
    with pytest.raises(ConfigError, match="vit_weights_file"):
        tiny_cfg(encoder="vit", vit_weights="file")
    with pytest.raises(WeightsError, match="do not exist"):
        tiny_net(cnn_blocks=[3, 4])  # test_resnet has 4 stages
    with pytest.raises(WeightsError, match="no offline weights"):
        build_teacher(TransformalyConfig(encoder="vit", vit_name="test_vit"), BackboneConfig())


# ---------------------------------------------------------------------------------- detector, resume
def test_fit_score_callbacks_and_parts(textures) -> None:
    det = create_detector(tiny_cfg())
    assert isinstance(det, Transformaly) and det.label == "transformaly (cnn-variant)"
    with pytest.raises(NotFittedError):
        det.score_parts(textures([0]))
    logged, bars = [], []
    det.fit(textures(range(6)), progress=lambda *a: bars.append(a), log_step=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == list(range(1, 11)) and bars[-1] == ("train", 10, 10)  # 5 epochs x 2
    assert {"loss", "epoch", "loss_block0", "loss_block1"} <= set(logged[0][1])
    assert logged[-1][1]["loss"] < logged[0][1]["loss"]
    good = textures([100, 101])
    agnostic, finetuned, amap = det.score_parts(good)
    np.testing.assert_allclose(det.score(good).image_scores, (agnostic + finetuned).astype(np.float32))
    assert amap.shape == (2, 64, 64)
    assert det.fit_stats_["pca_variance_kept"] >= 0.9
    with pytest.raises(ValueError, match="at least 2"):
        create_detector(tiny_cfg()).fit(textures([0]))


@pytest.mark.parametrize("cache", [True, False])
def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path, textures, cache: bool) -> None:
    cfg = tiny_cfg(checkpoint_every=2, cache_features=cache, epochs=3)  # 6 images, batch 4: 6 steps
    images = textures(range(6))
    full = Transformaly(cfg).fit(images)
    resumed, steps, left = fit_interrupted_then_resumed(lambda: Transformaly(cfg), images, tmp_path / "ckpt")
    assert left == 2 and steps == [3, 4, 5, 6] and resumed.fit_stats_["resumed_from_step"] == 2
    assert_same_weights(full.net_, resumed.net_)
    good = textures([100, 101])
    np.testing.assert_array_equal(full.score(good).image_scores, resumed.score(good).image_scores)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path: Path, textures) -> None:
    ckpt = tmp_path / "ckpt"
    Transformaly(tiny_cfg(checkpoint_every=3)).fit(textures(range(6)), checkpoint_dir=ckpt)
    assert logged_steps(Transformaly(tiny_cfg(checkpoint_every=3, lr=5e-4)), textures(range(6)),
                        checkpoint_dir=ckpt)[0] == 1
    model = Transformaly(tiny_cfg(epochs=1)).fit(textures(range(4))).save(tmp_path / "model")
    with pytest.raises(ArtifactError, match="not a transformaly checkpoint"):
        Transformaly(tiny_cfg()).fit(textures(range(6)), checkpoint_dir=model)


def test_save_load_round_trip_with_a_tiny_vit_and_metadata_labels(tmp_path: Path, textures) -> None:
    det = Transformaly(tiny_cfg(**TINY_VIT, epochs=1)).fit(textures(range(4)))
    path = det.save(tmp_path / "model")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["label"] == "transformaly" and meta["paper_encoder"] is True and meta["image_level_method"] is True
    assert "not the paper's" in meta["anomaly_map"]
    loaded = load_detector(path)
    good = textures([100, 101])
    np.testing.assert_array_equal(loaded.score(good).image_scores, det.score(good).image_scores)
    np.testing.assert_array_equal(loaded.score(good).anomaly_maps, det.score(good).anomaly_maps)
    cnn = Transformaly(tiny_cfg(epochs=1)).fit(textures(range(4))).save(tmp_path / "cnn")
    meta = json.loads((cnn / "metadata.json").read_text())
    assert meta["label"] == "transformaly (cnn-variant)" and meta["paper_encoder"] is False


# ---------------------------------------------------------------------------------- training mode (issue 18)
def test_train_mode_puts_only_the_students_in_train_mode_with_dropout(textures) -> None:
    net = tiny_net(**TINY_VIT, student_mode="train")
    params = tiny_cfg(**TINY_VIT).detector.transformaly
    net = TransformalyNet(net.teacher, params.blocks, "random", 0.0, seed=0, student_mode="train", dropout=0.5)
    assert not net.training and not any(m.training for m in net.modules())  # built in eval mode
    net.train()
    assert all(m.training for m in net.student.modules())
    assert not any(m.training for m in net.teacher.modules())  # the targets stay deterministic
    drops = [m for m in net.student.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.5 for m in drops)
    inputs = net.teacher_pass(textures(range(2))).student_inputs()
    torch.manual_seed(0)
    one = net.student_pass(inputs)
    two = net.student_pass(inputs)
    assert any(not torch.equal(a, b) for a, b in zip(one, two, strict=True))  # dropout active
    net.eval()
    assert not any(m.training for m in net.modules())
    three, four = net.student_pass(inputs), net.student_pass(inputs)
    assert all(torch.equal(a, b) for a, b in zip(three, four, strict=True))
    # student_mode eval: train() changes nothing (the default until 2026-11-27)
    frozen = TransformalyNet(net.teacher, params.blocks, "random", 0.0, seed=0, dropout=0.5).train()
    assert not any(m.training for m in frozen.modules())
    assert all(m.p == 0.0 for m in frozen.student.modules() if isinstance(m, torch.nn.Dropout))


def test_train_mode_fit_is_seeded_and_resumes_exactly(tmp_path: Path, textures) -> None:
    cfg = tiny_cfg(checkpoint_every=2, epochs=3, student_mode="train")  # BatchNorm on batch statistics
    images = textures(range(6))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    full = Transformaly(cfg).fit(images)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is untouched
    again = Transformaly(cfg).fit(images)
    assert_same_weights(full.net_, again.net_)
    assert not any(m.training for m in full.net_.modules())  # scored in eval mode
    resumed, steps, left = fit_interrupted_then_resumed(lambda: Transformaly(cfg), images, tmp_path / "ckpt")
    assert left == 2 and steps == [3, 4, 5, 6]
    assert_same_weights(full.net_, resumed.net_)
    eval_mode = Transformaly(tiny_cfg(epochs=3, student_mode="eval")).fit(images)
    good = textures([100, 101])
    assert not np.array_equal(full.score(good).image_scores, eval_mode.score(good).image_scores)


def test_a_model_saved_before_student_mode_existed_loads_as_trained_in_eval_mode(tmp_path: Path, textures,
                                                                                  monkeypatch) -> None:
    """The default became `train` on 2026-11-27; an older model's config has no student_mode and trained in eval."""
    import components.detector as detector_module

    Transformaly(tiny_cfg(epochs=1, student_mode="train")).fit(textures(range(3))).save(tmp_path / "m")
    assert Transformaly.load(tmp_path / "m").params.student_mode == "train"  # saved explicitly
    real = detector_module.read_saved_model

    def older(directory, method, needed):
        files, meta = real(directory, method, needed)
        del meta["config"]["detector"]["transformaly"]["student_mode"]
        return files, meta

    monkeypatch.setattr(detector_module, "read_saved_model", older)
    assert Transformaly.load(tmp_path / "m").params.student_mode == "eval"
