"""PatchCore specifics: the patch-embedding math, eq. 7 of the paper by hand, fit_features, index kinds."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.backbones import build_extractor
from components.config import Config
from components.detector import load_detector
from components.patchcore import PatchCore
from components.patchcore.model import PatchEmbedder, level_dims

TRAIN_SEEDS = range(8)


def with_params(cfg: Config, **params) -> Config:
    pc = cfg.detector.patchcore.model_copy(update=params)
    return cfg.model_copy(update={"detector": cfg.detector.model_copy(update={"patchcore": pc})})


@pytest.fixture(scope="module")
def extractor(tiny_config: Config):
    """test_resnet levels 1, 2: (B, 32, H/4, W/4) and (B, 48, H/8, W/8)."""
    return build_extractor(tiny_config.backbone)[0]


def local_mean(feat: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over each size x size neighbourhood with zero padding (counted), by explicit unfolding."""
    pad = size // 2
    b, c, h, w = feat.shape
    cols = F.unfold(F.pad(feat, (pad, pad, pad, pad)), size)  # (B, C * size * size, h * w)
    return cols.view(b, c, size * size, h * w).mean(2).view(b, c, h, w)


# ------------------------------------------------------------------------------------------ embedder
def test_level_dims() -> None:
    assert level_dims([32, 48], "auto", "auto") == ([32, 48], 80)
    assert level_dims([32, 48], 16, "auto") == ([16, 16], 32)
    assert level_dims([32, 48], "auto", 40) == ([32, 48], 40)
    assert level_dims([32, 48], 64, 100) == ([64, 64], 100)


def test_auto_dims_are_the_concatenation_of_pooled_upsampled_levels(extractor) -> None:
    embedder = PatchEmbedder(extractor, patch_size=3, patch_stride=1, pretrain_dim="auto", target_dim="auto")
    images = torch.rand(2, 3, 64, 48)
    with torch.inference_mode():
        emb = embedder(images)
        l1, l2 = extractor(images)
    assert embedder.embed_dim == 80 and embedder.stride == 4
    assert emb.shape == (2, 16, 12, 80)
    assert embedder.grid_size((64, 48)) == (16, 12)
    first = local_mean(l1, 3).permute(0, 2, 3, 1)
    deeper = F.interpolate(local_mean(l2, 3), size=(16, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(emb[..., :32], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[..., 32:], deeper.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_pooling_to_dims_averages_channel_groups(extractor) -> None:
    """32 and 48 channels -> 16 per level (pairs and triples averaged) -> 32 stacked -> 8 (groups of 4)."""
    embedder = PatchEmbedder(extractor, patch_size=1, patch_stride=1, pretrain_dim=16, target_dim=8)
    images = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        emb = embedder(images)
        l1, l2 = extractor(images)
    assert emb.shape == (1, 8, 8, 8)
    a = l1.permute(0, 2, 3, 1).reshape(1, 8, 8, 16, 2).mean(-1)
    b = F.interpolate(l2, size=(8, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    b = b.reshape(1, 8, 8, 16, 3).mean(-1)
    expected = torch.cat([a, b], -1).reshape(1, 8, 8, 8, 4).mean(-1)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)


def test_compact_embedding_keeps_every_distance(extractor) -> None:
    """32 + 48 channels pooled to 1024 has rank 80: the compact factor gives 80 dims, same distances."""
    paper = PatchEmbedder(extractor, 3, 1, pretrain_dim=1024, target_dim=1024, compact=False)
    compact = PatchEmbedder(extractor, 3, 1, pretrain_dim=1024, target_dim=1024, compact=True)
    assert paper.embed_dim == 1024 and compact.embed_dim == 80
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        a = paper(images).reshape(-1, 1024).double()
        b = compact(images).reshape(-1, 80).double()
        l1, l2 = extractor(images)
    torch.testing.assert_close(torch.cdist(b, b), torch.cdist(a, a), rtol=1e-4, atol=1e-4)
    # the paper's embedding itself: each level's channels repeated to 1024, stacked, pairs averaged
    first = local_mean(l1, 3).permute(0, 2, 3, 1)
    deeper = F.interpolate(local_mean(l2, 3), size=(8, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    stacked = torch.cat([F.adaptive_avg_pool1d(first.reshape(-1, 1, 32), 1024).reshape(2, 8, 8, 1024),
                         F.adaptive_avg_pool1d(deeper.reshape(-1, 1, 48), 1024).reshape(2, 8, 8, 1024)], -1)
    expected = stacked.reshape(2, 8, 8, 1024, 2).mean(-1)
    torch.testing.assert_close(a.float().reshape(2, 8, 8, 1024), expected, rtol=1e-4, atol=1e-5)


def test_patch_stride_and_size(extractor) -> None:
    embedder = PatchEmbedder(extractor, patch_size=5, patch_stride=2, pretrain_dim="auto", target_dim="auto")
    with torch.inference_mode():
        emb = embedder(torch.rand(1, 3, 64, 64))
    assert emb.shape[1:3] == embedder.grid_size((64, 64)) == (8, 8)
    assert embedder.stride == 8


# ------------------------------------------------------------------------------------------ scoring
def brute_force_scores(det: PatchCore, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reweighted scores (B,), max scores (B,), patch distance grids (B, h, w)) computed by hand."""
    bank = torch.from_numpy(det.memory_bank_).double()
    b = det.params.num_neighbors
    with torch.inference_mode():
        emb = det.embedder_(images).double()
    n, h, w, d = emb.shape
    reweighted, maxed, grids = [], [], []
    for patches in emb.reshape(n, h * w, d):
        dist = torch.cdist(patches, bank)  # (P, M)
        nearest, nn_idx = dist.min(1)
        worst = int(nearest.argmax())
        s_star = nearest[worst]
        m_star = bank[nn_idx[worst]]
        support = torch.cdist(m_star[None], bank)[0].topk(b, largest=False).indices  # N_b(m*), m* included
        to_support = torch.linalg.norm(bank[support] - patches[worst], dim=1)
        weight = 1.0 - torch.exp(torch.linalg.norm(patches[worst] - m_star)) / torch.exp(to_support).sum()
        reweighted.append(float(weight * s_star))
        maxed.append(float(s_star))
        grids.append(nearest.reshape(h, w).numpy())
    return np.array(reweighted), np.array(maxed), np.stack(grids)


@pytest.fixture(scope="module")
def small_bank_pair(tiny_config: Config, textures) -> tuple[PatchCore, PatchCore]:
    """Two detectors fitted to the same 20-entry bank, scoring 'reweighted' and 'max', no smoothing."""
    cfg = with_params(tiny_config, coreset_ratio=0.01, smoothing_sigma=0.0, num_neighbors=4)
    images = textures(TRAIN_SEEDS)
    rew = PatchCore(cfg).fit(images)
    mx = PatchCore(with_params(cfg, image_score="max")).fit(images)
    assert rew.memory_bank_.shape == (20, 32)
    np.testing.assert_array_equal(rew.memory_bank_, mx.memory_bank_)
    return rew, mx


def test_reweighted_score_is_eq7_by_hand(small_bank_pair, textures) -> None:
    rew, mx = small_bank_pair
    images = torch.cat([textures([300, 301]), textures([302, 303], defect=True)])
    expected_rew, expected_max, grids = brute_force_scores(rew, images)
    got_rew = rew.score(images)
    got_max = mx.score(images)
    np.testing.assert_allclose(got_rew.image_scores, expected_rew, rtol=1e-4)
    np.testing.assert_allclose(got_max.image_scores, expected_max, rtol=1e-4)
    assert (got_rew.image_scores <= got_max.image_scores).all()
    assert (got_rew.image_scores < got_max.image_scores).any()  # the weighting actually does something
    # with smoothing off, the map is exactly the bilinearly upsampled patch-distance grid
    up = F.interpolate(torch.from_numpy(grids)[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got_rew.anomaly_maps, up[:, 0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got_rew.anomaly_maps, got_max.anomaly_maps)


def test_reweighted_at_most_max_on_the_default_bank(tiny_config: Config, textures) -> None:
    images = textures(TRAIN_SEEDS)
    rew = PatchCore(tiny_config).fit(images)
    mx = PatchCore(with_params(tiny_config, image_score="max")).fit(images)
    test = torch.cat([textures(range(400, 404)), textures(range(404, 408), defect=True)])
    r, m = rew.score(test).image_scores, mx.score(test).image_scores
    assert (r <= m + 1e-6).all() and (r > 0).all()


# ------------------------------------------------------------------------------------------ fitting
def test_fit_features_equals_fit(tiny_config: Config, textures) -> None:
    images = textures(TRAIN_SEEDS)
    direct = PatchCore(tiny_config).fit(images)
    staged = PatchCore(tiny_config)
    features = staged.extract(images)
    assert features.shape == (8 * 16 * 16, 32) and features.dtype == torch.float32
    assert staged.fit_features(features) is staged
    np.testing.assert_array_equal(staged.memory_bank_, direct.memory_bank_)
    test = textures([500, 501])
    np.testing.assert_array_equal(staged.score(test).image_scores, direct.score(test).image_scores)
    assert staged.memory_bank_.shape == (coreset_rows(8 * 256, 0.25), 32)
    assert direct.fit_stats_["n_patches"] == 2048 and direct.fit_stats_["bank_size"] == 512
    with pytest.raises(ValueError, match=r"features must be \(N, 32\)"):
        staged.fit_features(features[:, :10])
    with pytest.raises(ValueError, match="at least one"):
        PatchCore(tiny_config).fit(iter([]))


def coreset_rows(n: int, ratio: float) -> int:
    return max(1, round(n * ratio))


def test_float16_features(tiny_config: Config, textures) -> None:
    det = PatchCore(with_params(tiny_config, feature_dtype="float16"))
    features = det.extract(textures(TRAIN_SEEDS))
    assert features.dtype == torch.float16
    det.fit_features(features)
    assert det.memory_bank_.dtype == np.float32
    ref = PatchCore(tiny_config).fit(textures(TRAIN_SEEDS))
    test = textures([600, 601])
    np.testing.assert_allclose(det.score(test).image_scores, ref.score(test).image_scores, rtol=0.05)


@pytest.mark.parametrize("index", ["ivf", "ivfpq", "hnsw"])
def test_approximate_indexes_round_trip(index: str, tiny_config: Config, textures, tmp_path: Path) -> None:
    cfg = with_params(tiny_config, index=index, ivf_lists=4, pq_subquantizers=8, hnsw_m=8)
    det = PatchCore(cfg).fit(textures(TRAIN_SEEDS))
    good = det.score(textures(range(100, 104)))
    bad = det.score(textures(range(200, 204), defect=True))
    assert bad.image_scores.min() > good.image_scores.max()
    path = det.save(tmp_path / "m")
    assert (path / "index.faiss").is_file()
    again = load_detector(path)
    np.testing.assert_array_equal(again.score(textures(range(100, 104))).image_scores, good.image_scores)
    saved = {k: v for k, v in asdict(det.index_report_).items() if not k.endswith("_s")}
    assert {k: v for k, v in asdict(again.index_report_).items() if not k.endswith("_s")} == saved
    assert again.index_report_.kind == index  # timings (build_s, check_s) are not saved


def test_auto_index_is_recall_checked_and_recorded(tiny_config: Config, textures, tmp_path: Path) -> None:
    """Above flat_max_bank entries `auto` builds HNSW, checks its recall on good patches outside the bank
    and records the check; its scores stay close to exact search."""
    exact = PatchCore(with_params(tiny_config, index="flat")).fit(textures(TRAIN_SEEDS))
    det = PatchCore(with_params(tiny_config, index="auto", flat_max_bank=100, index_recall=0.97)).fit(
        textures(TRAIN_SEEDS))
    report = det.index_report_
    assert report.kind in ("hnsw", "flat") and report.probes > 0 and report.target_recall == 0.97
    if report.kind == "hnsw":
        assert report.recall >= 0.97
    assert det.fit_stats_["index_recall"] == report.recall
    assert det.fit_stats_["index_exact"] == float(report.kind == "flat")
    test = textures([600, 601, 602])
    got, ref = det.score(test).anomaly_maps, exact.score(test).anomaly_maps
    rel = np.abs(got - ref) / np.maximum(ref, 1e-6)
    assert float(np.mean(rel > 0.02)) < 0.01 and float(rel.max()) < 0.2  # approximate, not arbitrary
    meta = json.loads((det.save(tmp_path / "m") / "metadata.json").read_text())
    assert meta["index"]["kind"] == report.kind and meta["index"]["recall"] == report.recall
    small = PatchCore(tiny_config).fit(textures(TRAIN_SEEDS))  # 512 entries <= flat_max_bank 1024: exact
    assert small.index_report_.kind == "flat" and not (small.save(tmp_path / "s") / "index.faiss").exists()


def test_radius_rule_keeps_a_smaller_bank_and_records_it(tiny_config: Config, textures) -> None:
    full = PatchCore(with_params(tiny_config, coreset_ratio=0.5)).fit(textures(TRAIN_SEEDS))
    auto = PatchCore(with_params(tiny_config, coreset_ratio=0.5, coreset_radius="auto",
                                 coreset_radius_quantile=1.0)).fit(textures(TRAIN_SEEDS))
    stats = auto.fit_stats_
    assert 0 < stats["coreset_radius_target"] and stats["neighbour_probes"] > 0
    assert len(auto.memory_bank_) < len(full.memory_bank_)
    assert stats["coreset_sq_radius"] <= stats["coreset_radius_target"] ** 2 * (1 + 1e-5)
    # the bank is a prefix of the ratio-only greedy order: same rows, first
    np.testing.assert_array_equal(auto.memory_bank_, full.memory_bank_[: len(auto.memory_bank_)])


def test_metadata_and_feature_key(tiny_config: Config, textures, tmp_path: Path) -> None:
    det = PatchCore(tiny_config).fit(textures(TRAIN_SEEDS))
    key = det.feature_key()
    assert key["weights_sha256"] == det.weights_.sha256 and len(key["weights_sha256"]) == 64
    assert key["backbone"] == "test_resnet" and key["layers"] == [1, 2]
    meta = json.loads((det.save(tmp_path / "m") / "metadata.json").read_text())
    assert meta["bank_size"] == 512 and meta["embed_dim"] == 32 and meta["grid"] == [16, 16]
    assert meta["backbone"]["weights_source"] == "random"
    assert meta["config"] == tiny_config.to_dict()
