"""Dinomaly: linear attention, the loose loss's hard-point mining, shapes through the model with tiny random
encoders (a ViT and the CNN variant), training schedule, checkpoint resume, save/load, the unified model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import components.dinomaly.detector  # noqa: F401  (registers "dinomaly")
from components.backbones import WeightsError
from components.config import BackboneConfig, ConfigError
from components.detector import (
    ArtifactError,
    NotFittedError,
    create_detector,
    load_detector,
    registered_detectors,
)
from components.dinomaly.config import DinomalyConfig, split_groups
from components.dinomaly.detector import Dinomaly
from components.dinomaly.encoders import build_encoder
from components.dinomaly.loss import (
    anomaly_map,
    global_cosine_distance,
    loose_loss,
    mining_quantile_at,
    mining_weights,
    point_distance,
)
from components.dinomaly.model import DinomalyNet, LinearAttention, elu_feature_map, linear_attention
from components.dinomaly.trainer import warm_cosine_lr
from components.dinomaly.unified import fit_unified
from components.maps import top_mean
from tests.conftest import TINY_METHOD_PARAMS, write_line
from tests.unit._trained import (
    assert_same_weights,
    fit_interrupted_then_resumed,
    logged_steps,
    tiny_method_cfg,
)

TINY_DINOMALY = TINY_METHOD_PARAMS["dinomaly"]  # the tiny CNN-variant section the contract tests use
TINY_VIT = {"encoder": "vit", "vit_name": "vit_tiny_patch16_224", "vit_weights": "random",
            "target_layers": [1, 2, 3, 4], "decoder_depth": 4, "num_groups": 2}


def tiny_cfg(**dinomaly):
    """conftest's tiny config (random test_resnet, 64 px) with method dinomaly and `dinomaly` overrides."""
    return tiny_method_cfg("dinomaly", **dinomaly)


# ------------------------------------------------------------------------------------ linear attention
def quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The explicit form: A = phi(Q) phi(K)^T (N, N), rows normalised to sum 1, times V."""
    a = elu_feature_map(q) @ elu_feature_map(k).transpose(-2, -1)
    return (a / a.sum(dim=-1, keepdim=True)) @ v


def test_linear_attention_equals_its_quadratic_form() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    out = linear_attention(q, k, v)
    assert out.shape == (2, 3, 7, 5)
    torch.testing.assert_close(out, quadratic_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_linear_attention_module_matches_explicit_heads() -> None:
    torch.manual_seed(0)
    attn = LinearAttention(dim=12, num_heads=3).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 3, 4).permute(2, 0, 3, 1, 4)
    heads = quadratic_attention(q, k, v).transpose(1, 2).reshape(2, 9, 12)
    torch.testing.assert_close(attn(x), attn.proj(heads), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not divisible"):
        LinearAttention(dim=10, num_heads=3)


# ------------------------------------------------------------------------------------------ loose loss
def test_loose_loss_scales_exactly_the_mined_points_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    enc = [torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    dec = [torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]

    def grads(factor: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [d.clone().requires_grad_(True) for d in dec]
        loss, _ = loose_loss(enc, leaves, quantile=0.9, factor=factor)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    plain_loss, plain = grads(1.0)  # factor 1 = plain global cosine loss
    mined_loss, mined = grads(0.1)
    expected_loss = sum(global_cosine_distance(e, d) for e, d in zip(enc, dec, strict=True)) / 2
    torch.testing.assert_close(plain_loss, expected_loss, rtol=0, atol=0)
    assert mined_loss == plain_loss  # mining changes gradients only
    for e, d, gp, gm in zip(enc, dec, plain, mined, strict=True):
        dist = point_distance(e, d)  # (2, 5, 5): 50 points; k = int(50 * 0.1) = 5 kept at full weight
        kth_largest = dist.flatten().sort(descending=True).values[4]
        well_reconstructed = (dist < kth_largest).unsqueeze(1).expand_as(gp)
        assert well_reconstructed[:, 0].sum() == 45
        assert torch.equal(gm[well_reconstructed], 0.1 * gp[well_reconstructed])
        assert torch.equal(gm[~well_reconstructed], gp[~well_reconstructed])
        assert gp[~well_reconstructed].abs().sum() > 0


def test_mining_weights_and_quantile_ramp() -> None:
    dist = torch.arange(10.0).reshape(1, 2, 5)
    w = mining_weights(dist, quantile=0.7, factor=0.25)  # k = 3: 7, 8, 9 keep weight 1
    assert w.shape == (1, 1, 2, 5)
    assert w.flatten().tolist() == [0.25] * 7 + [1.0] * 3
    assert (mining_weights(dist, 0.0, 0.1) == 1).all()  # quantile 0: nothing mined
    assert mining_quantile_at(0, 10_000, 0.9, 0.1) == 0.0
    assert mining_quantile_at(500, 10_000, 0.9, 0.1) == pytest.approx(0.45)
    assert mining_quantile_at(1000, 10_000, 0.9, 0.1) == pytest.approx(0.9)
    assert mining_quantile_at(9000, 10_000, 0.9, 0.1) == pytest.approx(0.9)
    assert mining_quantile_at(0, 100, 0.9, 0.0) == 0.9


def test_anomaly_map_and_top_mean() -> None:
    e = torch.ones(1, 3, 2, 2)
    d = e.clone()
    d[0, :, 0, 0] = -1.0  # opposite direction: distance 2
    m = anomaly_map([e, e], [d, e])  # mean of [2 at (0, 0)] and [0]
    assert m.shape == (1, 2, 2) and m[0, 0, 0].item() == pytest.approx(1.0) and abs(m[0, 1, 1].item()) < 1e-6
    maps = torch.arange(100.0).reshape(1, 10, 10)
    assert top_mean(maps, 0.05).item() == pytest.approx(97.0)  # mean of 95..99
    assert top_mean(maps, 0.001).item() == 99.0  # at least one value


# ------------------------------------------------------------------------------------------- shapes
def test_shapes_through_the_model_with_a_tiny_random_vit() -> None:
    params = DinomalyConfig(**TINY_VIT)
    encoder, info = build_encoder(params, BackboneConfig())
    assert info.source == "random" and encoder.kind == "vit"
    net = DinomalyNet(encoder, num_layers=4, num_groups=2, decoder_depth=4)
    assert net.encoder_groups == [[0, 1], [2, 3]] and net.decoder_groups == [[0, 1], [2, 3]]
    assert net.decoder[0].attn.num_heads == 3  # the ViT's own heads (dim 192)
    for size, grid in (((64, 64), (4, 4)), ((70, 50), (4, 3))):  # 70 x 50 is resized to 64 x 48
        features = net.train()(torch.rand(2, 3, *size))
        assert len(features.encoder) == len(features.decoder) == 2
        for tensor in features.encoder + features.decoder:
            assert tensor.shape == (2, 192, *grid)
    assert not net.encoder.training and net.bottleneck.training
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.trainable_modules().parameters())


def test_register_tokens_are_removed() -> None:
    params = DinomalyConfig(vit_name="vit_small_patch14_reg4_dinov2", vit_weights="random", encoder="vit",
                            target_layers=(2, 3), decoder_depth=2)
    encoder, _ = build_encoder(params, BackboneConfig())
    tokens = encoder(torch.rand(1, 3, 28, 28))
    assert tokens.grid == (2, 2) and [t.shape for t in tokens.layers] == [(1, 4, 384)] * 2
    assert len(encoder.vit.blocks) == 4  # pruned after the last target layer


def test_cnn_variant_places_each_stage_in_its_own_channel_block() -> None:
    params = DinomalyConfig(**TINY_DINOMALY)
    encoder, _ = build_encoder(params, BackboneConfig(name="mobilenetv2_050", weights="random"))
    tokens = encoder(torch.rand(2, 3, 64, 64))
    channels = encoder.channels
    assert encoder.embed_dim == sum(channels) and tokens.grid == (8, 8)
    start = 0
    for layer, c in zip(tokens.layers, channels, strict=True):
        assert layer.shape == (2, 64, sum(channels))
        inside = layer[..., start:start + c]
        assert torch.count_nonzero(layer) == torch.count_nonzero(inside)
        torch.testing.assert_close(inside.norm(dim=-1), torch.ones(2, 64))  # L2-normalised stage tokens
        start += c


def test_split_groups_and_config_validation() -> None:
    assert split_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_groups(3, 2) == [[0, 1], [2]]
    for bad, match in (({"num_groups": 4}, "num_groups"), ({"cnn_layers": [2, 1, 3]}, "strictly increasing"),
                       ({"warmup_steps": 6}, "warmup_steps"), ({"final_lr": 1.0}, "final_lr"),
                       ({"bottleneck_dropout": 1.0}, "bottleneck_dropout"), ({"encoder": "resnet"}, "encoder")):
        with pytest.raises(ConfigError, match=match):
            tiny_cfg(**bad)
    with pytest.raises(ConfigError, match="vit_weights_file"):
        tiny_cfg(encoder="vit", vit_weights="file")


# ------------------------------------------------------------------------------------- optimisation
def test_warm_cosine_schedule() -> None:
    lrs = [warm_cosine_lr(s, 2e-3, 2e-4, 1000, 100) for s in range(1000)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[99] == pytest.approx(2e-3) and lrs[100] == pytest.approx(2e-3)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:], strict=False))
    assert lrs[-1] == pytest.approx(2e-4, rel=1e-3)


# ---------------------------------------------------------------------------------- detector, resume
def test_registered_fit_score_and_callbacks(textures) -> None:
    assert "dinomaly" in registered_detectors()
    det = create_detector(tiny_cfg())
    assert isinstance(det, Dinomaly) and not det.is_fitted and det.label == "dinomaly (cnn-variant)"
    with pytest.raises(NotFittedError):
        det.score(textures([0]))
    logged, bars = [], []
    det.fit(textures(range(6)), progress=lambda *a: bars.append(a), log_step=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == list(range(1, 7)) and bars[-1] == ("train", 6, 6)
    assert {"loss", "lr", "mining_quantile", "grad_norm", "loss_group0", "loss_group1"} <= set(logged[0][1])
    assert logged[0][1]["lr"] == pytest.approx(2e-3) and logged[0][1]["mining_quantile"] == 0.0
    out = det.score(textures([100, 101, 102]))
    assert out.image_scores.shape == (3,) and out.anomaly_maps.shape == (3, 64, 64)
    assert np.isfinite(out.anomaly_maps).all()


@pytest.mark.parametrize("cache", [True, False])
def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path, textures, cache: bool) -> None:
    cfg = tiny_cfg(checkpoint_every=2, cache_features=cache)
    images = textures(range(6))
    full = Dinomaly(cfg).fit(images)
    resumed, steps, left = fit_interrupted_then_resumed(lambda: Dinomaly(cfg), images, tmp_path / "ckpt")
    assert left == 2 and steps == [3, 4, 5, 6] and resumed.fit_stats_["resumed_from_step"] == 2
    assert_same_weights(full.net_, resumed.net_)
    good = textures([100, 101])
    np.testing.assert_array_equal(full.score(good).anomaly_maps, resumed.score(good).anomaly_maps)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path: Path, textures) -> None:
    ckpt = tmp_path / "ckpt"
    Dinomaly(tiny_cfg(checkpoint_every=3)).fit(textures(range(6)), checkpoint_dir=ckpt)
    steps = logged_steps(Dinomaly(tiny_cfg(checkpoint_every=3, lr=1e-3)), textures(range(6)), checkpoint_dir=ckpt)
    assert steps[0] == 1
    model = Dinomaly(tiny_cfg(iterations=2)).fit(textures(range(4))).save(tmp_path / "model")
    with pytest.raises(ArtifactError, match="not a dinomaly checkpoint"):
        Dinomaly(tiny_cfg()).fit(textures(range(6)), checkpoint_dir=model)


def test_save_load_round_trip_with_a_tiny_vit(tmp_path: Path, textures) -> None:
    det = Dinomaly(tiny_cfg(**TINY_VIT, iterations=2)).fit(textures(range(4)))
    assert det.label == "dinomaly"
    path = det.save(tmp_path / "model")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["encoder_kind"] == "vit" and meta["paper_encoder"] is True
    loaded = load_detector(path)
    good = textures([100, 101])
    np.testing.assert_array_equal(loaded.score(good).anomaly_maps, det.score(good).anomaly_maps)


def test_vit_weights_from_a_file_and_offline_refusal(tmp_path: Path) -> None:
    source, _ = build_encoder(DinomalyConfig(**TINY_VIT), BackboneConfig())
    state = {k: v + 0.5 for k, v in source.vit.state_dict().items()}  # distinguishable weights
    save_file(state, str(tmp_path / "vit.safetensors"))
    params = DinomalyConfig(**{**TINY_VIT, "vit_weights": "auto", "vit_weights_file": tmp_path / "vit.safetensors"})
    encoder, info = build_encoder(params, BackboneConfig())
    assert info.source == "file"
    torch.testing.assert_close(encoder.vit.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    with pytest.raises(WeightsError, match="no offline weights"):
        build_encoder(DinomalyConfig(**{**TINY_VIT, "vit_weights": "auto"}), BackboneConfig())


# --------------------------------------------------------------------------------------------- unified
def test_fit_unified_serves_every_line_with_its_own_threshold(tmp_path: Path) -> None:
    roots = {"alpha": write_line(tmp_path / "alpha"), "beta": write_line(tmp_path / "beta", n_train=6)}
    result = fit_unified(tiny_cfg(), roots, max_train_images={"alpha": 8, "beta": None})
    det = result.detector
    assert result.n_fit == {"alpha": 6, "beta": 4} and result.n_calibration == {"alpha": 2, "beta": 2}
    assert det.fit_stats_["n_images"] == 10
    assert sorted(det.line_thresholds_) == ["alpha", "beta"] and det.threshold_ is None
    assert det.for_line("beta").threshold_ == det.line_thresholds_["beta"]
    with pytest.raises(ValueError, match="no threshold for line 'gamma'"):
        det.for_line("gamma")
    loaded = Dinomaly.load(det.save(tmp_path / "model"))
    assert {k: v.to_dict() for k, v in loaded.line_thresholds_.items()} == \
        {k: v.to_dict() for k, v in det.line_thresholds_.items()}
    assert json.loads((tmp_path / "model" / "metadata.json").read_text())["lines"] == ["alpha", "beta"]


def test_fit_unified_equals_fit_on_the_union(tmp_path: Path, textures) -> None:
    cfg = tiny_cfg()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"calibration_fraction": 0.0})})
    roots = {"a": write_line(tmp_path / "a", n_train=3), "b": write_line(tmp_path / "b", n_train=2)}
    unified = fit_unified(cfg, roots).detector
    union = Dinomaly(copy.deepcopy(cfg)).fit(textures([0, 1, 2, 0, 1]))
    for a, b in zip(unified.net_.state_dict().values(), union.net_.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- issue 18: options beside defaults
def test_shared_cnn_embedding_overlaps_stages_and_keeps_their_geometry() -> None:
    params = DinomalyConfig(**{**TINY_DINOMALY, "cnn_embedding": "shared"})
    backbone = BackboneConfig(name="mobilenetv2_050", weights="random")
    encoder, _ = build_encoder(params, backbone)
    blocks, _ = build_encoder(DinomalyConfig(**TINY_DINOMALY), backbone)
    images = torch.rand(2, 3, 64, 64)
    shared, separate = encoder(images), blocks(images)
    assert encoder.embed_dim == max(encoder.channels) < sum(encoder.channels)
    start = 0
    for s, b, c in zip(shared.layers, separate.layers, encoder.channels, strict=True):
        own = b[..., start:start + c]  # the stage's own (normalised) tokens
        start += c
        assert s.shape == (2, 64, encoder.embed_dim)
        torch.testing.assert_close(s.norm(dim=-1), torch.ones(2, 64))  # lengths kept
        torch.testing.assert_close(s @ s.transpose(1, 2), own @ own.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # overlapping: every stage writes into the same channels (blocks: disjoint supports)
    supports = [(layer.abs().sum(dim=(0, 1)) > 0) for layer in shared.layers]
    assert all((supports[0] & s).any() for s in supports[1:])
    for m in encoder.projections():
        torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1]), atol=1e-5, rtol=1e-5)


def test_shared_embedding_fit_and_round_trip(tmp_path: Path, textures) -> None:
    det = Dinomaly(tiny_cfg(cnn_embedding="shared", iterations=2)).fit(textures(range(4)))
    path = det.save(tmp_path / "model")
    loaded = load_detector(path)
    assert loaded.net_.encoder.embedding == "shared"
    for a, b in zip(loaded.net_.encoder.projections(), det.net_.encoder.projections(), strict=True):
        assert torch.equal(a, b)
    good = textures([100, 101])
    np.testing.assert_array_equal(loaded.score(good).anomaly_maps, det.score(good).anomaly_maps)


def test_prefix_tokens_pass_through_the_decoder_and_are_stripped_at_the_output() -> None:
    params = DinomalyConfig(vit_name="vit_small_patch14_reg4_dinov2", vit_weights="random", encoder="vit",
                            target_layers=(2, 3), decoder_depth=2, vit_prefix_tokens="decode")
    encoder, _ = build_encoder(params, BackboneConfig())
    dropped, _ = build_encoder(params.model_copy(update={"vit_prefix_tokens": "drop"}), BackboneConfig())
    images = torch.rand(1, 3, 28, 28)
    tokens = encoder(images)
    assert tokens.grid == (2, 2) and [t.shape for t in tokens.layers] == [(1, 5 + 4, 384)] * 2  # CLS + 4 reg
    torch.testing.assert_close(tokens.layers[0][:, 5:], dropped(images).layers[0])  # same patch tokens
    net = DinomalyNet(encoder, num_layers=2, num_groups=2, decoder_depth=2).eval()
    encoded = net.encode(images)
    assert encoded.fused.shape == (1, 9, 384)  # the prefix tokens enter the bottleneck ...
    out = net(images)
    assert [t.shape for t in out.encoder + out.decoder] == [(1, 384, 2, 2)] * 4  # ... and leave at the output
    # the prefix tokens change the decoded patch tokens (linear attention mixes every token)
    plain = DinomalyNet(dropped, num_layers=2, num_groups=2, decoder_depth=2).eval()
    plain.load_state_dict(net.state_dict())
    assert not torch.allclose(plain(images).decoder[0], out.decoder[0])
    torch.testing.assert_close(plain(images).encoder[0], out.encoder[0])
