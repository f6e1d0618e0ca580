"""Tiled patch embedding: images larger than the backbone's sweet spot, embedded at native resolution.

An image larger than the tile in a dimension is cut into overlapping tiles of one size (stride
tile - overlap, the last tile flush with the border), the embedder runs on all tiles as batches (one frozen
backbone graph, since every tile has the same size), and the tiles' patch grids are stitched into the one
grid the untiled embedder gives for that image, so the anomaly map, its upsampling and the image score
downstream are unchanged. Each grid cell comes from the tile in which it lies farthest from a tile cut (a
tile edge inside the image), so the convolutions' zero padding at tile edges reaches the result only at
the image border, as without tiles.

Geometry. Tile offsets are multiples of `align` (the least common multiple of the backbone levels' strides
and the embedding stride s), so tile cell j of a tile at offset o is cell o / s + j of the image's grid on
every level. An image whose tiled dimension is not a multiple of `align` is padded at the bottom / right,
up to the next multiple, with the backbone's mean colour (zero after normalisation, like the convolutions'
own padding); the last tile is flush with that padded border, and the stitched grid is cut back to the
untiled grid's length ceil(H / s) + (g_t - t / s) (g_t: the tile's grid length; the backbone's
convolutions pad by kernel // 2, as timm's CNNs do, so a level of stride s has ceil(H / s) cells).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image size lie, in pixels. Every tile is tile_hw (H, W); padded_hw >= image_hw
    is the extent the tiles cover; rows / cols are the tiles' top / left offsets (tile (r, c) is index
    r * len(cols) + c)."""

    image_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.rows) * len(self.cols)


def check_tile(tile: int, overlap: int, align: int = 1) -> None:
    """ValueError unless 0 <= overlap < tile and both are multiples of `align` px."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap {overlap} for tile {tile}")
    if tile % align or overlap % align:
        raise ValueError(f"tile {tile} and overlap {overlap} px must be multiples of {align} px for this "
                         "backbone (the least common multiple of its levels' strides and the patch stride)")


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> tuple[int, int, tuple[int, ...]]:
    """One axis of the plan -> (padded length, tile extent, tile offsets).

    length <= tile: one tile covering the axis (padded length = extent = length, offsets (0,)). Else the
    length is padded up to a multiple of `align` and tiles of `tile` start every tile - overlap pixels, the
    last one flush with the padded end: ceil((padded - tile) / (tile - overlap)) + 1 tiles.
    """
    check_tile(tile, overlap, align)
    if length <= tile:
        return length, length, (0,)
    padded = math.ceil(length / align) * align
    starts = tuple(range(0, padded - tile, tile - overlap)) + (padded - tile,)
    return padded, tile, starts


def plan_tiles(image_hw: tuple[int, int], tile_hw: tuple[int, int], overlap: int, align: int = 1) -> TilePlan:
    """The tiles of an (H, W) image for tiles of tile_hw (H, W) overlapping by `overlap` px (see axis_starts)."""
    ph, th, rows = axis_starts(int(image_hw[0]), int(tile_hw[0]), overlap, align)
    pw, tw, cols = axis_starts(int(image_hw[1]), int(tile_hw[1]), overlap, align)
    return TilePlan((int(image_hw[0]), int(image_hw[1])), (ph, pw), (th, tw), rows, cols)


def cut_tiles(images: torch.Tensor, plan: TilePlan, fill: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) -> tiles (B * n_tiles, C, th, tw), image-major, tiles in row-major order.
    The padding up to plan.padded_hw takes the colour `fill` (C,)."""
    b, c, h, w = images.shape
    if plan.padded_hw != (h, w):
        canvas = fill.to(images).view(1, c, 1, 1).expand(b, c, *plan.padded_hw).clone()
        canvas[..., :h, :w] = images
        images = canvas
    th, tw = plan.tile_hw
    tiles = [images[:, :, r: r + th, q: q + tw] for r in plan.rows for q in plan.cols]
    return torch.stack(tiles, dim=1).reshape(b * plan.n_tiles, c, th, tw)


def cell_owners(starts: Sequence[int], tile_cells: int, grid_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis: for each cell i of the stitched grid, the tile holding it farthest from a tile cut.

    starts (n,): the tiles' first cells on the stitched grid; tile_cells: cells per tile; grid_len: G.
    -> (tile (G,), local (G,)) int64, the tile index along this axis and the cell's index inside it. The
    margin of cell i in tile k is its distance to the nearer cut edge; the first tile's start and the last
    tile's end lie on the image border and are no cut. Ties go to the earlier tile.
    """
    s = np.asarray(starts, dtype=np.int64)[None, :]
    local = np.arange(grid_len, dtype=np.int64)[:, None] - s  # (G, n)
    n, far = s.shape[1], np.iinfo(np.int64).max
    low = np.where(np.arange(n) > 0, local, far)
    high = np.where(np.arange(n) < n - 1, tile_cells - 1 - local, far)
    margin = np.where((local >= 0) & (local < tile_cells), np.minimum(low, high), -1)
    if grid_len and margin.max(1).min() < 0:
        raise ValueError(f"tiles starting at cells {list(starts)} ({tile_cells} each) do not cover {grid_len}")
    tile = margin.argmax(1)
    return torch.from_numpy(tile), torch.from_numpy(local[np.arange(grid_len), tile])


def stitch(tile_grids: torch.Tensor, plan: TilePlan, stride: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """tile_grids (B, n_tiles, g_h, g_w, D) -> (B, G_h, G_w, D): each cell of the stitched grid from the tile
    in which it lies farthest from a cut (`cell_owners` per axis); tile offsets / stride are the tiles' first
    cells."""
    g_h, g_w = tile_grids.shape[2:4]
    tile_r, loc_r = cell_owners([r // stride for r in plan.rows], g_h, grid_hw[0])
    tile_c, loc_c = cell_owners([c // stride for c in plan.cols], g_w, grid_hw[1])
    which = tile_r[:, None] * len(plan.cols) + tile_c[None, :]  # (G_h, G_w)
    return tile_grids[:, which, loc_r[:, None], loc_c[None, :]]


def stitched_len(length: int, extent: int, tile_cells: int, stride: int) -> int:
    """Grid length of the untiled image along one axis from a tile's: tile_cells + ceil((length - extent) / s)."""
    return tile_cells + math.ceil((length - extent) / stride)


class TiledEmbedder(nn.Module):
    """A patch embedder run on overlapping tiles, stitched: same interface as PatchEmbedder.

    forward: images (B, 3, H, W) in [0, 1] -> (B, h, w, D), (h, w) the untiled embedder's grid for (H, W).
    An image within tile_size is passed to the embedder whole (bitwise its output). Tiles go to the
    embedder `batch_size` at a time. `embed_dim`, `stride`, `extractor` and `graph` are the embedder's.
    """

    def __init__(self, embedder: nn.Module, tile_size: tuple[int, int], overlap: int, batch_size: int = 16) -> None:
        super().__init__()
        self.embedder = embedder
        self.tile_size = (int(tile_size[0]), int(tile_size[1]))
        self.overlap = int(overlap)
        self.batch_size = max(1, int(batch_size))
        self.align = math.lcm(*embedder.extractor.strides, embedder.stride)
        for tile in self.tile_size:
            check_tile(tile, self.overlap, self.align)

    @property
    def extractor(self) -> nn.Module:
        return self.embedder.extractor

    @property
    def embed_dim(self) -> int:
        return self.embedder.embed_dim

    @property
    def stride(self) -> int:
        return self.embedder.stride

    @property
    def graph(self) -> bool:
        return getattr(self.embedder, "graph", False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        if h <= self.tile_size[0] and w <= self.tile_size[1]:
            return self.embedder(images)
        plan = plan_tiles((h, w), self.tile_size, self.overlap, self.align)
        tiles = cut_tiles(images, plan, self.extractor.mean.flatten())
        grids = torch.cat([self.embedder(chunk) for chunk in tiles.split(self.batch_size)])
        g_h, g_w = grids.shape[1:3]
        grid_hw = (stitched_len(h, plan.tile_hw[0], g_h, self.stride),
                   stitched_len(w, plan.tile_hw[1], g_w, self.stride))
        return stitch(grids.view(b, plan.n_tiles, *grids.shape[1:]), plan, self.stride, grid_hw).contiguous()
