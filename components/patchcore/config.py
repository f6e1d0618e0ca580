"""PatchCore's typed, frozen hyperparameters (the `detector.patchcore` section of params.yaml).

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022): locally aware patch
features of a pretrained CNN, a greedy (k-center) coreset of the good patches as the memory bank, and the
nearest-bank distance as the anomaly score.

This module imports nothing from components.config (which imports it): no cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from components.method_config import MethodConfig
from components.type_aliases import Fraction, PositiveInt

TILE_ALIGN = 32  # tile_size and tile_overlap in multiples of this (the deepest usual backbone stride)


class PatchCoreConfig(MethodConfig):
    """seed, threads, smoothing_sigma: components.method_config."""

    patch_size: PositiveInt = 3
    patch_stride: PositiveInt = 1
    pretrain_embed_dim: PositiveInt | Literal["auto"] = "auto"
    target_embed_dim: PositiveInt | Literal["auto"] = "auto"
    compact_embedding: bool = True
    # coreset: greedy k-center over the patch embeddings, stopped at coreset_ratio of the patches or, with
    # coreset_radius, once every patch lies within that radius of the bank (whichever comes first)
    coreset_ratio: Fraction = 0.1
    coreset_radius: Annotated[float, Field(gt=0.0)] | Literal["auto"] | None = None
    coreset_radius_quantile: Fraction = 0.5  # "auto": this quantile of good-to-good neighbour distances
    coreset_shards: PositiveInt | Literal["auto"] = "auto"  # >1: composable coreset over spatial shards
    projection_dim: Annotated[int, Field(ge=0)] = 128
    # search: auto = exact below flat_max_bank entries, else HNSW with efSearch set by a recall check at fit
    index: Literal["auto", "flat", "hnsw", "ivf", "ivfpq"] = "auto"
    index_recall: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    flat_max_bank: Annotated[int, Field(ge=0)] = 1024
    hnsw_m: Annotated[int, Field(ge=4, le=128)] = 16
    refine_top: Annotated[int, Field(ge=0)] = 8  # hnsw / ivf: each image's hottest patches searched 16x wider
    ivf_lists: PositiveInt = 256
    pq_subquantizers: PositiveInt = 16
    num_neighbors: PositiveInt = 9
    image_score: Literal["reweighted", "max"] = "reweighted"
    feature_dtype: Literal["float32", "float16"] = "float32"
    # fit: patch features to an on-disk store (same selection; RAM grows with N * projection_dim, not N * D):
    # auto = spill once the in-memory features pass stream_threshold_mb; feature_dir: store folder (None: TMPDIR)
    stream_features: bool | Literal["auto"] = "auto"
    stream_threshold_mb: PositiveInt = 2048
    feature_dir: Path | None = None
    # tiling (components.patchcore.tiling): an image larger than tile_size (H, W) px in a dimension is embedded
    # in overlapping tiles of exactly tile_size (stride tile - tile_overlap, the last one flush with the border)
    # stitched into the one grid of the untiled image; null = whole images. Multiples of TILE_ALIGN px.
    tile_size: tuple[PositiveInt, PositiveInt] | None = None
    tile_overlap: Annotated[int, Field(ge=0)] = 64

    @field_validator("tile_size", "tile_overlap")
    @classmethod
    def _tile_aligned(cls, value: tuple[int, int] | int | None) -> tuple[int, int] | int | None:
        sizes = (value,) if isinstance(value, int) else (value or ())
        if any(v % TILE_ALIGN for v in sizes):
            raise ValueError(f"must be a multiple of {TILE_ALIGN} px (keeps every backbone level's grid "
                             f"aligned across tiles), got {value}")
        return value

    @model_validator(mode="after")
    def _tile_overlap_fits(self) -> PatchCoreConfig:
        if self.tile_size is not None and self.tile_overlap >= min(self.tile_size):
            raise ValueError(f"tile_overlap ({self.tile_overlap}) must be smaller than tile_size "
                             f"{list(self.tile_size)}")
        return self

    @model_validator(mode="after")
    def _coreset_rule(self) -> PatchCoreConfig:
        if self.coreset_radius is not None and self.coreset_shards not in (1, "auto"):
            raise ValueError("coreset_radius needs coreset_shards: 1 or auto (a radius stop is one global run)")
        return self
