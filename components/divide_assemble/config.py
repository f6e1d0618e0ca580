"""Divide-and-Assemble's typed, frozen hyperparameters (the `detector.divide_assemble` section of params.yaml).

Hou et al., "Divide-and-Assemble: Learning Block-wise Memory for Unsupervised Anomaly Detection" (ICCV 2021):
a U-Net whose skip connections (and bottleneck) pass through multi-scale block-wise memory modules, trained
with an L2 reconstruction loss, an adversarial loss and a feature-alignment loss.

Defaults are sized for a 2-core CPU (128 px working resolution inside the detector, 200 steps of batch 8);
params.yaml gives the paper's values in [brackets]. Here the alignment features come from a frozen offline
ImageNet backbone (the `backbone` section); the paper aligns the discriminator's latent features instead.

This module imports nothing from components.config (which imports it): no cycle. That is why it derives
from pydantic's BaseModel with the same frozen/forbid settings as components.config.Section.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class DivideAssembleConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # ---- generator: U-Net with block-wise memory on every skip connection and the bottleneck
    image_size: PositiveInt = 128
    channels: tuple[PositiveInt, ...] = (8, 16, 32, 64)
    norm_groups: PositiveInt = 4
    memory_size: PositiveInt = 64
    block_sizes: tuple[PositiveInt, ...] = (2, 4)
    fuse: Literal["conv", "mean"] = "conv"
    temperature: PositiveFloat = 0.1
    shrink_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # ---- discriminator (patch discriminator, LSGAN objective)
    disc_channels: tuple[PositiveInt, ...] = (32, 64, 128)
    # ---- loss weights
    rec_weight: NonNegativeFloat = 1.0
    adv_weight: NonNegativeFloat = 0.01
    align_weight: NonNegativeFloat = 0.1
    # ---- optimisation (Adam for both networks, constant learning rates)
    iterations: PositiveInt = 200
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 1e-3
    lr_d: PositiveFloat = 2e-4
    betas: tuple[Beta, Beta] = (0.5, 0.999)
    seed: int = 0
    checkpoint_every: NonNegativeInt = 0
    # ---- scoring and runtime
    score_align_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    smoothing_sigma: NonNegativeFloat = 4.0
    top_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: NonNegativeInt = 0

    @model_validator(mode="after")
    def _consistent(self) -> DivideAssembleConfig:
        if len(self.channels) < 2:
            raise ValueError("channels needs at least 2 levels (one skip connection and the bottleneck)")
        if not self.block_sizes:
            raise ValueError("block_sizes needs at least one granularity")
        if len(set(self.block_sizes)) != len(self.block_sizes):
            raise ValueError(f"block_sizes must not repeat, got {list(self.block_sizes)}")
        for level, size in enumerate(self.level_sizes):
            for block in self.block_sizes:
                if size % block:
                    raise ValueError(f"image_size {self.image_size}: level {level} is {size} px, not divisible "
                                     f"by block size {block} (image_size must be a multiple of "
                                     f"{2 ** (len(self.channels) - 1) * max(self.block_sizes)})")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"channels {list(self.channels)} must all be divisible by norm_groups "
                                 f"{self.norm_groups}")
        if self.rec_weight + self.adv_weight + self.align_weight == 0:
            raise ValueError("rec_weight, adv_weight and align_weight are all 0: nothing to train")
        return self

    @property
    def level_sizes(self) -> list[int]:
        """Side of the square feature map at each U-Net level: image_size / 2**level (floored)."""
        return [self.image_size // 2 ** level for level in range(len(self.channels))]
