"""Divide-and-Assemble: block-wise memory (read = explicit weighted sum, shapes per block size, a small memory
cannot pass its input through), networks, losses, training callbacks, checkpoint resume, fit through
components.training.fit_line. The Detector contract itself runs in tests/unit/components/test_detector.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import ConfigError
from components.detector import (
    ArtifactError,
    NotFittedError,
    create_detector,
    load_detector,
    registered_detectors,
)
from components.divide_assemble.config import DivideAssembleConfig
from components.divide_assemble.detector import DivideAssemble, to_working_size
from components.divide_assemble.losses import (
    MapScales,
    alignment_map,
    combine_maps,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    reconstruction_map,
)
from components.divide_assemble.memory import (
    BlockMemory,
    MultiScaleBlockMemory,
    address,
    block_assemble,
    block_divide,
    hard_shrink,
)
from components.divide_assemble.networks import DiscriminatorFeatures, Generator, PatchDiscriminator
from components.training import fit_line
from tests.conftest import TINY_METHOD_PARAMS
from tests.unit._trained import (
    assert_same_weights,
    fit_interrupted_then_resumed,
    logged_steps,
    tiny_method_cfg,
)

TINY = TINY_METHOD_PARAMS["divide_assemble"]  # the tiny section the contract tests use
LOSS_KEYS = {"loss_g", "loss_d", "loss_rec", "loss_adv", "loss_align", "lr"}


def tiny_cfg(**params):
    """conftest's tiny config (random test_resnet, 64 px) with method divide_assemble and overrides."""
    return tiny_method_cfg("divide_assemble", **params)


# ---------------------------------------------------------------------------------------------- memory
def test_memory_read_equals_its_explicit_weighted_sum() -> None:
    torch.manual_seed(0)
    mem = BlockMemory(channels=3, block=2, size=5, temperature=0.5)
    x = torch.randn(2, 3, 4, 6)
    out = mem(x)
    for b in range(2):
        for row in range(0, 4, 2):
            for col in range(0, 6, 2):
                query = x[b, :, row:row + 2, col:col + 2].reshape(-1)  # (channel, row, col) order
                cos = torch.stack([torch.nn.functional.cosine_similarity(query, m, dim=0) for m in mem.memory])
                w = torch.exp(cos / 0.5) / torch.exp(cos / 0.5).sum()
                expected = sum(w[i] * mem.memory[i] for i in range(5)).reshape(3, 2, 2)
                torch.testing.assert_close(out[b, :, row:row + 2, col:col + 2], expected, rtol=1e-5, atol=1e-6)
    weights = mem.weights(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6))


@pytest.mark.parametrize("block", [1, 2, 4])
def test_shapes_for_each_block_size(block: int) -> None:
    x = torch.randn(2, 8, 8, 16)
    blocks = block_divide(x, block)
    assert blocks.shape == (2, (8 // block) * (16 // block), 8 * block * block)
    torch.testing.assert_close(block_assemble(blocks, (8, 16), block), x)  # divide/assemble is lossless
    mem = BlockMemory(8, block, size=7, temperature=0.1)
    assert mem.memory.shape == (7, 8 * block * block)
    assert mem.weights(x).shape == (2, (8 // block) * (16 // block), 7)
    assert mem(x).shape == x.shape


@pytest.mark.parametrize("fuse", ["conv", "mean"])
def test_multi_scale_memory_combines_granularities(fuse: str) -> None:
    torch.manual_seed(0)
    mem = MultiScaleBlockMemory(8, (1, 2, 4), size=6, temperature=0.1, fuse=fuse)
    x = torch.randn(2, 8, 8, 8)
    out = mem(x)
    assert out.shape == x.shape
    if fuse == "mean":
        torch.testing.assert_close(out, torch.stack([branch(x) for branch in mem.branches]).mean(0))
    with pytest.raises(ValueError, match="not divisible into 4x4 blocks"):
        mem(torch.randn(1, 8, 6, 8))


def test_hard_shrink_sparsifies_and_renormalises() -> None:
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    s = hard_shrink(w, 0.2)
    assert s[0, 2] == 0 and s[0, 3] == 0 and s[0, 0] > 0 and s[0, 1] > 0
    torch.testing.assert_close(s.sum(-1), torch.ones(1))
    assert torch.equal(hard_shrink(w, 0.0), w)
    weights = address(torch.randn(10, 4), torch.randn(8, 4), temperature=0.1, shrink=1 / 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))


def _trained_to_reconstruct(mem: BlockMemory, x: torch.Tensor, steps: int = 150) -> BlockMemory:
    """mem after `steps` Adam steps (lr 0.05) minimising its squared reconstruction error of x (B, C, H, W)."""
    optimizer = torch.optim.Adam(mem.parameters(), lr=0.05)
    for _ in range(steps):
        loss = (mem(x) - x).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return mem


def test_small_memory_cannot_pass_varied_inputs_through() -> None:
    """With 2 items every output block lies in their span, so even a memory trained to reconstruct its inputs
    keeps at least the best rank-2 approximation error (Eckart-Young), far from pass-through."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, 8, 8)  # 16 * 16 varied blocks of dimension 16
    mem = _trained_to_reconstruct(BlockMemory(4, block=2, size=2, temperature=0.1), x)
    with torch.no_grad():
        out_blocks = block_divide(mem(x), 2).reshape(-1, 16)
        coeffs = torch.linalg.lstsq(mem.memory.t(), out_blocks.t()).solution
        torch.testing.assert_close(coeffs.t() @ mem.memory, out_blocks, rtol=1e-4, atol=1e-4)  # in the span
        queries = block_divide(x, 2).reshape(-1, 16)
        singular = torch.linalg.svdvals(queries)
        rank2_error = singular[2:].pow(2).sum().sqrt() / queries.norm()
        error = (out_blocks - queries).norm() / queries.norm()
    assert rank2_error > 0.8  # varied inputs: two directions explain little of them
    assert error >= rank2_error - 1e-4 and error > 0.8
    # a memory as large as the input dimension, by contrast, learns to reconstruct far better
    big = _trained_to_reconstruct(BlockMemory(4, block=2, size=64, temperature=0.1), x)
    with torch.no_grad():
        assert (big(x) - x).norm() / x.norm() < error - 0.2


# -------------------------------------------------------------------------------- networks and losses
def test_generator_and_discriminator_shapes() -> None:
    p = DivideAssembleConfig(**TINY)
    gen, disc = Generator(p), PatchDiscriminator((8, 16))
    x = torch.rand(2, 3, 64, 64)
    y = gen(x)
    assert y.shape == x.shape and (y >= 0).all() and (y <= 1).all()
    assert len(gen.memories) == len(p.channels)  # every skip connection and the bottleneck
    assert disc(x).shape == (2, 1, 16, 16)


def test_losses_and_map_combination() -> None:
    real, fake = torch.full((2, 1, 4, 4), 1.0), torch.zeros(2, 1, 4, 4)
    assert lsgan_discriminator_loss(real, fake).item() == 0.0
    assert lsgan_generator_loss(fake).item() == 1.0
    x, r = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(reconstruction_map(x, r), torch.ones(1, 2, 2))
    feats = [torch.randn(1, 4, 2, 2), torch.randn(1, 5, 1, 1)]
    assert alignment_map(feats, feats, (4, 4)).abs().max() < 1e-6
    opposite = alignment_map(feats, [-f for f in feats], (4, 4))
    torch.testing.assert_close(opposite, torch.full((1, 4, 4), 2.0))
    combined = combine_maps(torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 3.0), MapScales(0.1, 1.5), 0.25)
    torch.testing.assert_close(combined, torch.full((1, 2, 2), 0.75 * 2.0 + 0.25 * 2.0))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="not divisible by block size 4"):
        tiny_cfg(image_size=40)
    with pytest.raises(ConfigError, match="must not repeat"):
        tiny_cfg(block_sizes=[2, 2])
    with pytest.raises(ConfigError, match="norm_groups"):
        tiny_cfg(channels=[6, 16, 16])
    assert DivideAssembleConfig().level_sizes == [128, 64, 32, 16]


# ------------------------------------------------------------------------------ detector, training, resume
def test_fit_logs_every_step_and_maps_come_back_at_the_input_size(textures) -> None:
    assert "divide_assemble" in registered_detectors()
    det = create_detector(tiny_cfg(image_size=32, iterations=3))
    assert isinstance(det, DivideAssemble) and not det.is_fitted
    with pytest.raises(NotFittedError):
        det.score(textures([0]))
    logged, bars = [], []
    det.fit(textures(range(6)), progress=lambda *a: bars.append(a), log_step=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [1, 2, 3] and bars[-1] == ("train", 3, 3)
    assert set(logged[0][1]) == LOSS_KEYS and all(np.isfinite(v) for _, m in logged for v in m.values())
    assert logged[0][1]["lr"] == pytest.approx(1e-3)
    out = det.score(textures([100, 101]))  # 64 px in, 32 px inside, 64 px maps out
    assert out.anomaly_maps.shape == (2, 64, 64) and np.isfinite(out.anomaly_maps).all()
    assert det.scales_.reconstruction > 0 and det.scales_.alignment > 0
    assert to_working_size(torch.rand(1, 3, 64, 48), 32).shape == (1, 3, 32, 32)


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path, textures) -> None:
    cfg = tiny_cfg(iterations=5, checkpoint_every=2)
    images = textures(range(6))
    full = DivideAssemble(cfg).fit(images)
    ckpt = tmp_path / "ckpt"
    resumed, steps, left = fit_interrupted_then_resumed(lambda: DivideAssemble(cfg), images, ckpt)
    assert left == 2 and steps == [3, 4, 5] and resumed.fit_stats_["resumed_from_step"] == 2
    assert_same_weights(full.generator_, resumed.generator_)
    good = textures([100, 101])
    np.testing.assert_array_equal(full.score(good).anomaly_maps, resumed.score(good).anomaly_maps)
    state = json.loads((ckpt / "checkpoint.json").read_text())
    assert state["step"] == 5 and set(state["param_groups"]) == {"g", "d"}  # both optimisers


def test_checkpoint_of_another_run_is_not_resumed(tmp_path: Path, textures) -> None:
    ckpt = tmp_path / "ckpt"
    DivideAssemble(tiny_cfg(iterations=3, checkpoint_every=3)).fit(textures(range(4)), checkpoint_dir=ckpt)
    assert logged_steps(DivideAssemble(tiny_cfg(iterations=3, checkpoint_every=3, lr=5e-4)), textures(range(4)),
                        checkpoint_dir=ckpt) == [1, 2, 3]
    model = DivideAssemble(tiny_cfg(iterations=1)).fit(textures(range(4))).save(tmp_path / "model")
    with pytest.raises(ArtifactError, match="not a divide_assemble checkpoint"):
        DivideAssemble(tiny_cfg(iterations=1)).fit(textures(range(4)), checkpoint_dir=model)


def test_fit_line_passes_log_step_and_checkpoints(tmp_path: Path, make_line) -> None:
    root = make_line(tmp_path / "line", n_train=6, n_good_test=1, n_defect=1)
    logged = []
    result = fit_line(tiny_cfg(iterations=4, checkpoint_every=2), root, log_step=lambda s, m: logged.append((s, m)),
                      checkpoint_dir=tmp_path / "ckpt")
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert all(set(m) == LOSS_KEYS for _, m in logged)
    assert json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["step"] == 4
    assert result.detector.is_fitted and result.detector.threshold_ is not None
    assert result.detector.fit_stats_["n_images"] == result.n_fit


# ------------------------------------------------------------------------- issue 18: options beside defaults
def test_discriminator_features_are_its_latent_activations() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator((8, 16))
    x = torch.rand(2, 3, 32, 32)
    feats = DiscriminatorFeatures(disc)(x)
    assert [f.shape for f in feats] == [(2, 8, 16, 16), (2, 16, 8, 8)]
    h = torch.nn.functional.leaky_relu(disc.net[0](x * 2 - 1), 0.2)
    torch.testing.assert_close(feats[0], h)
    torch.testing.assert_close(disc.net[-1](feats[-1]), disc(x))  # the logits sit on top of them


def test_discriminator_alignment_fit_score_and_round_trip(tmp_path: Path, textures) -> None:
    det = DivideAssemble(tiny_cfg(align_features="discriminator", iterations=3)).fit(textures(range(4)))
    assert det.discriminator_ is not None and isinstance(det.aligner(), DiscriminatorFeatures)
    good = textures([100, 101])
    out = det.score(good)
    assert out.anomaly_maps.shape == (2, 64, 64) and np.isfinite(out.anomaly_maps).all()
    loaded = load_detector(det.save(tmp_path / "model"))
    np.testing.assert_array_equal(loaded.score(good).anomaly_maps, out.anomaly_maps)
    imagenet = DivideAssemble(tiny_cfg(iterations=3)).fit(textures(range(4)))  # the default: ImageNet features
    assert imagenet.discriminator_ is None and imagenet.aligner() is imagenet.extractor_
    assert not np.array_equal(imagenet.score(good).anomaly_maps, out.anomaly_maps)


def test_working_size_can_follow_the_data_size(textures) -> None:
    p = DivideAssembleConfig(**{**TINY, "image_size": 0})
    assert p.working_size((64, 64)) == 64 and DivideAssembleConfig(**TINY).working_size((64, 64)) == 64
    assert DivideAssembleConfig().working_size((256, 256)) == 128  # the default: 128 whatever the data
    with pytest.raises(ValueError, match="square"):
        p.working_size((64, 48))
    with pytest.raises(ValueError, match="not divisible"):
        p.working_size((40, 40))
    det = DivideAssemble(tiny_cfg(image_size=0, iterations=1)).fit(textures(range(4)))
    assert det.working_size() == 64 and det.score(textures([100])).anomaly_maps.shape == (1, 64, 64)
