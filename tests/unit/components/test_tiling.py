"""Tests for components.patchcore.tiling: the tile plan, the stitching rule, the TiledEmbedder against the
untiled PatchEmbedder, PatchCore with tiling on, and the config checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.backbones import build_extractor
from components.config import Config, ConfigError, load_config, validate
from components.detector import load_detector
from components.patchcore import PatchCore
from components.patchcore.model import PatchEmbedder
from components.patchcore.tiling import (
    TiledEmbedder,
    axis_starts,
    cell_owners,
    cut_tiles,
    plan_tiles,
    stitch,
)
from tests.conftest import texture, with_square


def with_tiles(cfg: Config, tile_size: list[int] | None, overlap: int = 32) -> Config:
    raw = cfg.to_dict()
    raw["detector"]["patchcore"].update(tile_size=tile_size, tile_overlap=overlap)
    return validate(raw, source="with_tiles")


@pytest.fixture(scope="module")
def extractor(tiny_config: Config):
    """test_resnet levels 1, 2: strides 4 and 8."""
    return build_extractor(tiny_config.backbone)[0].eval()


class CellProbe(nn.Module):
    """A stand-in embedder on a stride-4 grid: channel 0 = the running number of the image it was given
    (across calls: for tiles, the tile index), channels 1, 2 = the image's channels 0, 1 at each cell's
    top-left pixel. forward (B, 3, H, W) -> (B, ceil(H / 4), ceil(W / 4), 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Module()
        self.extractor.register_buffer("mean", torch.full((1, 3, 1, 1), -1.0))
        self.extractor.strides = [4, 8]
        self.stride, self.embed_dim, self.seen = 4, 3, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        number = torch.arange(self.seen, self.seen + b, dtype=images.dtype)
        self.seen += b
        cells = images[:, :2, ::4, ::4].permute(0, 2, 3, 1)
        return torch.cat([number.view(b, 1, 1, 1).expand(*cells.shape[:3], 1), cells], dim=-1)


def coordinates(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w): channel 0 = row, channel 1 = column, channel 2 = 0."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([rows, cols, torch.zeros_like(rows)])[None]


def most_interior(starts_px: list[int], tile: int, cell: int, stride: int = 4) -> int:
    """Brute force, in pixels: the tile whose cut edges are farthest from cell's top-left pixel (first on ties)."""
    best, best_margin = -1, -math.inf
    for k, start in enumerate(starts_px):
        pixel = cell * stride
        if not start <= pixel < start + tile:
            continue
        low = pixel - start if k > 0 else math.inf
        high = start + tile - stride - pixel if k < len(starts_px) - 1 else math.inf
        if min(low, high) > best_margin:
            best, best_margin = k, min(low, high)
    return best


# ------------------------------------------------------------------------------------------- tile plan
def test_axis_starts_counts_stride_and_flush_last_tile() -> None:
    assert axis_starts(64, 64, 32) == (64, 64, (0,))
    assert axis_starts(50, 64, 32) == (50, 50, (0,))  # within the tile: the axis in one piece
    assert axis_starts(160, 64, 32) == (160, 64, (0, 32, 64, 96))
    assert axis_starts(170, 64, 32, align=8) == (176, 64, (0, 32, 64, 96, 112))  # padded to 176
    for length in range(65, 400, 7):
        for tile, overlap in ((64, 0), (64, 32), (128, 64), (128, 96)):
            if length <= tile:
                continue
            padded, extent, starts = axis_starts(length, tile, overlap, align=32)
            assert extent == tile and padded % 32 == 0 and length <= padded < length + 32
            assert starts[0] == 0 and starts[-1] + tile == padded  # last tile flush with the (padded) border
            assert all(s % 32 == 0 for s in starts)
            steps = np.diff(starts)
            assert (steps[:-1] == tile - overlap).all() and 0 < steps[-1] <= tile - overlap
            assert len(starts) == math.ceil((padded - tile) / (tile - overlap)) + 1


def test_plan_tiles_and_cut_tiles() -> None:
    plan = plan_tiles((100, 72), (64, 64), 32, align=8)
    assert plan.padded_hw == (104, 72) and plan.tile_hw == (64, 64)
    assert plan.rows == (0, 32, 40) and plan.cols == (0, 8) and plan.n_tiles == 6
    wide = plan_tiles((61, 200), (64, 64), 32, align=8)
    assert wide.tile_hw == (61, 64) and wide.rows == (0,) and wide.cols == (0, 32, 64, 96, 128, 136)
    images = torch.rand(2, 3, 100, 72)
    tiles = cut_tiles(images, plan, torch.tensor([0.1, 0.2, 0.3]))
    assert tiles.shape == (12, 3, 64, 64)
    assert torch.equal(tiles[1], images[0, :, 0:64, 8:72]) and torch.equal(tiles[6 + 2], images[1, :, 32:96, 0:64])
    last = tiles[5]  # rows 40..104 of image 0: 60 real rows, then 4 rows of the fill colour
    assert torch.equal(last[:, :60], images[0, :, 40:100, 8:72])
    assert torch.equal(last[:, 60:], torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).expand(3, 4, 64))


@pytest.mark.parametrize(("tile", "overlap", "align", "match"), [
    (64, 64, 1, "overlap"), (64, 80, 1, "overlap"), (64, 16, 32, "multiples of 32"), (48, 0, 32, "multiples")])
def test_bad_tiles_are_refused(tile: int, overlap: int, align: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        axis_starts(200, tile, overlap, align)


# ------------------------------------------------------------------------------------------- stitching
def test_cell_owners_pick_the_tile_farthest_from_a_cut() -> None:
    # three tiles of 16 cells at cells 0, 8, 16 (tile 64 px, overlap 32, stride 4) over 32 cells
    tile, local = cell_owners([0, 8, 16], 16, 32)
    assert tile.tolist() == [0] * 12 + [1] * 8 + [2] * 12
    assert (torch.tensor([0, 8, 16])[tile] + local).tolist() == list(range(32))
    for starts_px, length in (([0, 32, 64, 96], 160), ([0, 32, 64, 96, 112], 176), ([0, 32, 40], 104)):
        tile, local = cell_owners([s // 4 for s in starts_px], 16, length // 4)
        expected = [most_interior(starts_px, 64, i) for i in range(length // 4)]
        assert tile.tolist() == expected
        assert ((torch.tensor(starts_px) // 4)[tile] + local).tolist() == list(range(length // 4))


def test_stitch_takes_each_cell_from_its_most_interior_tile() -> None:
    plan = plan_tiles((104, 72), (64, 64), 32, align=8)  # rows (0, 32, 40), cols (0, 8)
    grids = torch.zeros(2, plan.n_tiles, 16, 16, 3)
    grids[..., 0] = torch.arange(plan.n_tiles, dtype=torch.float32).view(1, -1, 1, 1)
    grids[..., 1] = torch.arange(16, dtype=torch.float32).view(1, 1, -1, 1)
    grids[..., 2] = torch.arange(16, dtype=torch.float32).view(1, 1, 1, -1)
    grids[1] += 100.0
    out = stitch(grids, plan, 4, (26, 18))
    assert out.shape == (2, 26, 18, 3) and torch.equal(out[1] - out[0], torch.full((26, 18, 3), 100.0))
    for i in range(26):
        for j in range(18):
            r, c = most_interior([0, 32, 40], 64, i), most_interior([0, 8], 64, j)
            assert out[0, i, j].tolist() == [r * 2 + c, i - plan.rows[r] // 4, j - plan.cols[c] // 4]


def test_tiled_embedder_with_a_probe_embedder() -> None:
    """The probe's channel 0 numbers the tiles it was given: every cell comes from its most interior tile;
    channels 1, 2 carry pixel coordinates: each cell lands where the untiled probe puts it."""
    for hw in ((100, 72), (128, 160), (64, 130)):
        tiled = TiledEmbedder(CellProbe(), (64, 64), 32, batch_size=4)  # 4 tiles per call: several calls
        image = coordinates(*hw)
        out = tiled(image)
        whole = CellProbe()(image)
        assert out.shape == whole.shape
        assert torch.equal(out[..., 1:], whole[..., 1:])
        plan = plan_tiles(hw, (64, 64), 32, align=8)
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                r = most_interior(list(plan.rows), plan.tile_hw[0], i)
                c = most_interior(list(plan.cols), plan.tile_hw[1], j)
                assert out[0, i, j, 0] == r * len(plan.cols) + c


# ------------------------------------------------------------------------------------- real embedder
def test_tile_covering_the_image_is_bitwise_untiled(extractor) -> None:
    embedder = PatchEmbedder(extractor, 3, 1, "auto", "auto", graph=True).eval()
    tiled = TiledEmbedder(embedder, (64, 96), 32)
    assert (tiled.embed_dim, tiled.stride, tiled.extractor, tiled.graph) == (80, 4, extractor, True)
    for hw in ((64, 96), (40, 56), (64, 64)):
        images = torch.rand(2, 3, *hw)
        with torch.inference_mode():
            assert torch.equal(tiled(images), embedder(images))


@pytest.mark.parametrize(("patch_size", "patch_stride"), [(3, 1), (4, 1), (3, 2)])
def test_tiled_grid_is_the_untiled_grid(extractor, patch_size: int, patch_stride: int) -> None:
    embedder = PatchEmbedder(extractor, patch_size, patch_stride, "auto", "auto").eval()
    tiled = TiledEmbedder(embedder, (64, 64), 32)
    for hw in ((100, 72), (96, 130), (64, 97)):
        images = torch.rand(1, 3, *hw)
        with torch.inference_mode():
            a, b = tiled(images), embedder(images)
        assert a.shape == b.shape and a.is_contiguous()
        assert (a - b).abs().mean() < 0.25 * b.abs().mean()  # the same features, up to tile-edge effects


# -------------------------------------------------------------------------------------------- PatchCore
def textures_of(seeds, h: int, w: int, defect: bool = False) -> torch.Tensor:
    out = []
    for s in seeds:
        image = texture(s, max(h, w))[:h, :w]
        out.append(with_square(image)[0] if defect else image)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255.0)


def test_patchcore_with_tiles_round_trip(tiny_config: Config, tmp_path: Path) -> None:
    cfg = with_tiles(tiny_config, [64, 64], 32)
    det = PatchCore(cfg).fit(textures_of(range(6), 100, 80))
    assert isinstance(det.embedder_, TiledEmbedder) and det.grid_ == (25, 20)
    good = det.score(textures_of(range(100, 103), 100, 80))
    bad = det.score(textures_of(range(200, 203), 100, 80, defect=True))
    assert good.anomaly_maps.shape == (3, 100, 80) and good.image_scores.shape == (3,)
    assert bad.image_scores.min() > good.image_scores.max()
    key = det.feature_key()
    assert key["tile_size"] == [64, 64] and key["tile_overlap"] == 32
    assert "tile_size" not in PatchCore(tiny_config).feature_key()  # untiled keys unchanged
    again = load_detector(det.save(tmp_path / "m"))
    assert isinstance(again.embedder_, TiledEmbedder)
    scores = again.score(textures_of(range(100, 103), 100, 80))
    np.testing.assert_array_equal(scores.image_scores, good.image_scores)
    np.testing.assert_array_equal(scores.anomaly_maps, good.anomaly_maps)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("override", "key", "reason"), [
    ("detector.patchcore.tile_size=[48, 64]", "detector.patchcore.tile_size", "multiple of 32"),
    ("detector.patchcore.tile_overlap=40", "detector.patchcore.tile_overlap", "multiple of 32"),
    ("detector.patchcore.tile_overlap=-32", "detector.patchcore.tile_overlap", "greater than or equal"),
    ("detector.patchcore.tile_size=[64]", "detector.patchcore.tile_size", "Field required"),
])
def test_bad_tile_config_names_the_key(override: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value) and reason in str(info.value)


def test_tile_overlap_must_be_smaller_than_the_tile() -> None:
    with pytest.raises(ConfigError, match=r"tile_overlap \(64\) must be smaller than tile_size \[64, 128\]"):
        load_config(None, ["detector.patchcore.tile_size=[64, 128]", "detector.patchcore.tile_overlap=64"])
    cfg = load_config(None, ["detector.patchcore.tile_size=[512, 512]", "detector.patchcore.tile_overlap=0"])
    assert cfg.detector.patchcore.tile_size == (512, 512) and cfg.detector.patchcore.tile_overlap == 0
    defaults = load_config(None)
    assert defaults.detector.patchcore.tile_size is None and defaults.data.resize == "resize"
    assert load_config(None, ["data.resize=aspect"]).data.resize == "aspect"
    assert load_config(None, ["data.resize=none"]).data.resize == "none"
