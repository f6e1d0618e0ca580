"""PatchCore.update: the greedy coreset continued from an existing bank (components.coreset.extend_coreset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components import coreset
from components.config import Config
from components.detector import load_detector
from components.patchcore import PatchCore


def with_params(cfg: Config, **params) -> Config:
    pc = cfg.detector.patchcore.model_copy(update=params)
    return cfg.model_copy(update={"detector": cfg.detector.model_copy(update={"patchcore": pc})})


def test_extend_coreset_continues_the_greedy_selection() -> None:
    """Selecting M points on A, then extending over B with no radius limit and the same budget, picks
    exactly what one greedy run over A + B would pick after A's points when those come first."""
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    bank = x[:5]
    to_bank = torch.cdist(x.double(), bank.double()).min(1).values.pow(2).float()
    picked = coreset.extend_coreset(x, to_bank, 20, sq_radius=0.0)
    # reference: textbook loop starting from the bank
    ref, dist = [], to_bank.double().clone()
    for _ in range(20):
        i = int(dist.argmax())
        ref.append(i)
        dist = torch.minimum(dist, ((x.double() - x[i].double()) ** 2).sum(1))
    assert picked.indices.tolist() == ref
    assert picked.sq_radius == pytest.approx(float(dist.max()), rel=1e-4)
    # with the covering radius of the result, nothing more is added
    again = coreset.extend_coreset(x, torch.from_numpy(dist.float().numpy()), 20, sq_radius=float(dist.max()))
    assert len(again.indices) == 0


def test_update_keeps_every_old_row_and_records_it(tiny_config: Config, textures, tmp_path: Path) -> None:
    cfg = with_params(tiny_config, coreset_ratio=0.1)
    det = PatchCore(cfg).fit(textures(range(4)))
    old = det.memory_bank_.copy()
    det.update(textures(range(100, 104)), lineage={"source": "new-batch", "files": 4})
    assert len(det.memory_bank_) > len(old)
    np.testing.assert_array_equal(det.memory_bank_[: len(old)], old)  # old rows unchanged, first
    assert det.index_.ntotal == len(det.memory_bank_)
    record = det.updates_[-1]
    assert record["n_images"] == 4 and record["n_patches"] == 4 * 16 * 16
    assert record["bank_size_before"] == len(old) and record["bank_size_after"] == len(det.memory_bank_)
    assert 0 < record["added"] <= round(0.1 * 4 * 256)
    assert record["data"] == {"source": "new-batch", "files": 4}
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    assert again.updates_ == [{k: v for k, v in u.items() if k != "seconds"} for u in det.updates_]  # no timings saved
    np.testing.assert_array_equal(again.memory_bank_, det.memory_bank_)
    # refitting starts a new lineage
    assert PatchCore(cfg).fit(textures(range(2))).updates_ == []


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_update_with_the_same_images_adds_almost_nothing(tiny_config: Config, textures, dtype: str) -> None:
    cfg = with_params(tiny_config, coreset_ratio=0.1, feature_dtype=dtype)
    images = textures(range(5))
    det = PatchCore(cfg).fit(images)
    before = len(det.memory_bank_)
    det.update(images)
    assert det.updates_[-1]["added"] <= 1, det.updates_[-1]
    assert len(det.memory_bank_) - before == det.updates_[-1]["added"]


def test_update_scores_new_kind_of_good_images_lower(tiny_config: Config, textures) -> None:
    """Images brighter than any fitted one look anomalous before the update and normal after it."""
    cfg = with_params(tiny_config, coreset_ratio=0.25)
    det = PatchCore(cfg).fit(textures(range(4)))
    bright = (textures(range(200, 204)) * 0.5 + 0.5).clamp(0, 1)
    probe = (textures([300]) * 0.5 + 0.5).clamp(0, 1)
    before = float(det.score(probe).image_scores[0])
    det.update(bright)
    after = float(det.score(probe).image_scores[0])
    assert after < 0.7 * before, (before, after)


def test_update_needs_a_fitted_model(tiny_config: Config, textures) -> None:
    from components.detector import NotFittedError

    with pytest.raises(NotFittedError):
        PatchCore(tiny_config).update(textures([0]))


def test_update_streamed_equals_in_memory(tiny_config: Config, textures, tmp_path: Path) -> None:
    cfg = with_params(tiny_config, coreset_ratio=0.1, feature_dtype="float16")
    a = PatchCore(with_params(cfg, stream_features=False)).fit(textures(range(3)))
    b = PatchCore(with_params(cfg, stream_features=True, feature_dir=tmp_path)).fit(textures(range(3)))
    a.update(textures(range(10, 13)))
    b.update(textures(range(10, 13)))
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)


def test_cli_update_saves_the_grown_model(tiny_config: Config, make_line, tmp_path: Path) -> None:
    from components.data import scan_line
    from components.training import image_stream
    from flows.cli import main

    line = make_line(tmp_path / "line", n_train=6, n_good_test=0, n_defect=0)
    train = scan_line(line, require_test=False).train
    det = PatchCore(with_params(tiny_config, coreset_ratio=0.1)).fit(image_stream(train[:3], tiny_config.data))
    det.save(tmp_path / "m")
    new = tmp_path / "new"
    new.mkdir()
    for s in train[3:]:
        (new / s.path.name).write_bytes(s.path.read_bytes())
    assert main(["update", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m2"), "--quiet", str(new)]) == 0
    grown = load_detector(tmp_path / "m2")
    np.testing.assert_array_equal(grown.memory_bank_[: len(det.memory_bank_)], det.memory_bank_)
    record = grown.updates_[-1]
    assert record["n_images"] == 3 and record["data"]["n_files"] == 3
    assert len(record["data"]["files_sha256"]) == 64
    assert main(["update", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m3"), "--quiet",
                 str(tmp_path / "missing")]) == 2
