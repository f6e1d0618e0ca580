"""Tests for components.patchcore.features (the on-disk feature store) and streamed PatchCore fits:
the stream selects bitwise the same coreset and bank as the in-memory path for the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from components import coreset
from components.config import Config
from components.patchcore import PatchCore
from components.patchcore.features import FeatureStore, FeatureStoreError, FeatureWriter, merge_stores
from components.patchcore.streaming import Workspace, collect_features, project_store


def with_params(cfg: Config, **params) -> Config:
    pc = cfg.detector.patchcore.model_copy(update=params)
    return cfg.model_copy(update={"detector": cfg.detector.model_copy(update={"patchcore": pc})})


def rows(n: int, dim: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ store
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_in_chunks_and_safetensors_compatible(tmp_path: Path, dtype: str) -> None:
    x = rows(1000)
    path = tmp_path / "f.safetensors"
    with FeatureWriter(path, 24, dtype, {"grid": "4,5"}) as writer:
        for part in x.split(77):  # uneven chunks
            writer.append(part)
    store = FeatureStore(path)
    expected = x.numpy().astype(np.float16 if dtype == "float16" else np.float32)
    assert store.shape == (1000, 24) and store.dtype == dtype and store.metadata["grid"] == "4,5"
    np.testing.assert_array_equal(store.read(), expected)
    np.testing.assert_array_equal(np.concatenate([c for _, c in store.iter_chunks(128)]), expected)
    # a valid safetensors file: the retrain flow's cache reader loads it as is
    np.testing.assert_array_equal(load_file(str(path))["features"].numpy(), expected)
    assert not list(tmp_path.glob(".*tmp"))


def test_gather_any_order_with_repeats(tmp_path: Path) -> None:
    x = rows(500).half()
    with FeatureWriter(tmp_path / "f", 24) as writer:
        writer.append(x)
    store = FeatureStore(tmp_path / "f")
    idx = torch.tensor([499, 0, 130, 129, 130, 7, 256])
    np.testing.assert_array_equal(store.gather(idx, rows=64), x[idx].numpy())
    assert store.gather(torch.tensor([], dtype=torch.long)).shape == (0, 24)
    with pytest.raises(IndexError):
        store.gather(torch.tensor([500]))


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with pytest.raises(RuntimeError, match="boom"), FeatureWriter(path, 24) as writer:
        writer.append(rows(10))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"\(n, 24\)"), FeatureWriter(path, 24) as writer:
        writer.append(rows(3, dim=8))


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FeatureStoreError, match="no such feature store"):
        FeatureStore(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FeatureStoreError, match="junk"):
        FeatureStore(junk)
    path = tmp_path / "f"
    with FeatureWriter(path, 24) as writer:
        writer.append(rows(10))
    with open(path, "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(FeatureStoreError, match="truncated or padded"):
        FeatureStore(path)


def test_merge_keeps_order(tmp_path: Path) -> None:
    parts = []
    for i in range(3):
        with FeatureWriter(tmp_path / f"p{i}", 24) as writer:
            writer.append(rows(50 + i, seed=i))
        parts.append(FeatureStore(tmp_path / f"p{i}"))
    merged = merge_stores(parts, tmp_path / "all", rows=16)
    np.testing.assert_array_equal(merged.read(), np.concatenate([p.read() for p in parts]))


# ------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize(("dim", "proj"), [(24, 8), (24, 0), (24, 64)])
def test_projection_stream_is_bitwise_the_in_memory_projection(dim: int, proj: int) -> None:
    x = rows(3000, dim).half()
    stream = coreset.ProjectionStream(dim, proj, seed=3, block=512)
    for part in x.split(101):
        stream.add(part)
    xp = stream.finish()
    matrix = coreset.projection_matrix(dim, proj, 3)
    expected = torch.cat([b.float() if matrix is None else b.float() @ matrix for b in x.split(512)])
    assert torch.equal(xp, expected)


def test_streamed_coreset_selects_the_same_indices(tmp_path: Path) -> None:
    x = rows(40000, 48, seed=1).half()  # more than one PROJECTION_BLOCK
    ref = coreset.select_coreset(x, 0.002, seed=2, projection_dim=16)
    with FeatureWriter(tmp_path / "f", 48) as writer:
        writer.append(x)
    xp = project_store(FeatureStore(tmp_path / "f"), 16, 2)
    got = coreset.greedy_coreset_projected(xp, 0.002, seed=2)
    assert torch.equal(got.indices, ref.indices) and got.sq_radius == ref.sq_radius
    assert torch.equal(ref.indices, coreset.greedy_coreset(x, 0.002, seed=2, projection_dim=16))


@pytest.mark.parametrize(("mode", "threshold", "on_disk"), [(False, 1, False), (True, 1 << 30, True),
                                                            ("auto", 1 << 30, False), ("auto", 5000, True)])
def test_collect_modes(tmp_path: Path, mode, threshold: int, on_disk: bool) -> None:
    x = rows(400, 24).half()
    with Workspace(tmp_path / "ws") as ws:
        got = collect_features(iter(x.split(40)), 24, "float16", mode, threshold, ws.path, 8, 0)
        assert (got.store is not None) == on_disk
        assert got.n_rows == 400
        idx = torch.tensor([3, 399, 17])
        assert torch.equal(got.gather(idx), x[idx].float())
        assert torch.equal(got.projected(8, 0), coreset.random_projection(x, 8, 0))
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").iterdir())  # removed after use


def test_streamed_fit_gives_the_in_memory_bank(tiny_config: Config, textures, tmp_path: Path) -> None:
    """The acceptance check: stream_features true (fp16 store on disk) == in memory (fp16), bitwise."""
    images = textures(range(6))
    base = with_params(tiny_config, feature_dtype="float16", coreset_ratio=0.1)
    ref = PatchCore(with_params(base, stream_features=False)).fit(images)
    streamed = PatchCore(with_params(base, stream_features=True, feature_dir=tmp_path / "spill")).fit(images)
    np.testing.assert_array_equal(streamed.memory_bank_, ref.memory_bank_)
    assert streamed.fit_stats_["streamed"] == 1.0 and ref.fit_stats_["streamed"] == 0.0
    assert streamed.fit_stats_["coreset_sq_radius"] == ref.fit_stats_["coreset_sq_radius"]
    assert streamed.grid_ == ref.grid_
    assert not any((tmp_path / "spill").iterdir())  # the store is removed after fit
    probe = textures([50, 51], defect=True)
    np.testing.assert_array_equal(streamed.score(probe).image_scores, ref.score(probe).image_scores)


def test_fit_store_from_a_saved_store(tiny_config: Config, textures, tmp_path: Path) -> None:
    det = PatchCore(with_params(tiny_config, feature_dtype="float16"))
    features = det.extract(textures(range(4)))
    with FeatureWriter(tmp_path / "f", features.shape[1], "float16", {"grid": "16,16"}) as writer:
        writer.append(features)
    a = PatchCore(det.cfg).fit_store(FeatureStore(tmp_path / "f"))
    b = PatchCore(det.cfg).fit_features(features)
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    assert a.grid_ == (16, 16)
    with pytest.raises(ValueError, match="-dim"):
        with FeatureWriter(tmp_path / "g", 5, "float16") as writer:
            writer.append(torch.zeros(3, 5))
        PatchCore(det.cfg).fit_store(FeatureStore(tmp_path / "g"))
