"""The PatchCore backbone ensemble's typed, frozen settings (the `detector.patchcore_ensemble` section).

Every member is a PatchCore with the `detector.patchcore` settings and its own backbone from `backbones`;
`backbone.layers` (or `layers` here), `backbone.weights` and `backbone.allow_network` apply to every member.
`backbone.weights_file` belongs to `backbone.name` only: it is used for the member of that name, never for
the others (one file cannot hold several architectures).

This module imports nothing from components.config (which imports it): no cycle. That is why it derives
from pydantic's BaseModel with the same frozen/forbid settings as components.config.Section.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PatchCoreEnsembleConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # timm names, one member each; chosen before any measurement: the smallest and the largest packaged
    # backbone (different families, different input normalisation)
    backbones: Annotated[tuple[str, ...], Field(min_length=2)] = ("mobilenetv2_100", "tf_efficientnet_lite2")
    layers: Annotated[tuple[Annotated[int, Field(ge=0)], ...], Field(min_length=1)] | None = None  # None: backbone.layers
    combine: Literal["mean", "max"] = "mean"  # of the members' normalised maps and image scores
    # each member's scale: this quantile of its good-to-good patch neighbour distances (training images)
    normalise_quantile: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5

    @field_validator("backbones")
    @classmethod
    def _distinct(cls, backbones: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({b for b in backbones if backbones.count(b) > 1})
        if repeated:
            raise ValueError(f"each backbone at most once (repeated: {repeated}); members would be identical")
        if any(not b.strip() for b in backbones):
            raise ValueError("backbone names must not be empty")
        return backbones
