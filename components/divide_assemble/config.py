"""Divide-and-Assemble's typed, frozen hyperparameters (the `detector.divide_assemble` section of params.yaml).

Hou et al., "Divide-and-Assemble: Learning Block-wise Memory for Unsupervised Anomaly Detection" (ICCV 2021):
a U-Net whose skip connections (and bottleneck) pass through multi-scale block-wise memory modules, trained
with an L2 reconstruction loss, an adversarial loss and a feature-alignment loss.

Defaults are sized for a 2-core CPU (128 px working resolution inside the detector, 200 steps of batch 8);
params.yaml gives the paper's values in [brackets]. By default the alignment features come from a frozen
offline ImageNet backbone (the `backbone` section); `align_features: discriminator` aligns the
discriminator's latent features instead, as the paper does. `image_size: 0` makes the working resolution
follow data.image_size.

This module imports nothing from components.config (which imports it): no cycle. That is why it derives
from components.method_config (frozen, unknown keys rejected, as components.config.Section).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from components.method_config import TrainedMethodConfig
from components.type_aliases import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class DivideAssembleConfig(TrainedMethodConfig):
    """seed, threads, smoothing_sigma, checkpoint_every, device: components.method_config."""

    # ---- generator: U-Net with block-wise memory on every skip connection and the bottleneck
    image_size: NonNegativeInt = 128  # 0: follow data.image_size (square)
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
    # ---- whose features are aligned (training loss and score): "imagenet" = the frozen `backbone` section
    # (default, as before), "discriminator" = the patch discriminator's latent features (the paper's way)
    align_features: Literal["imagenet", "discriminator"] = "imagenet"
    # ---- optimisation (Adam for both networks, constant learning rates)
    iterations: PositiveInt = 200
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 1e-3
    lr_d: PositiveFloat = 2e-4
    betas: tuple[Beta, Beta] = (0.5, 0.999)
    # ---- scoring
    score_align_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    top_ratio: Fraction = 0.01

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
        return level_sizes(self.image_size, len(self.channels))

    def working_size(self, data_size: tuple[int, int]) -> int:
        """The square working side: image_size, or data.image_size (H, W) when image_size is 0 (ValueError
        when that is not square or not divisible as the U-Net needs)."""
        if self.image_size:
            return self.image_size
        h, w = data_size
        if h != w:
            raise ValueError(f"divide_assemble image_size 0 follows data.image_size, which must be square; got {h}x{w}")
        for level, size in enumerate(level_sizes(h, len(self.channels))):
            if any(size % b for b in self.block_sizes):
                raise ValueError(f"data.image_size {h}: U-Net level {level} is {size} px, not divisible by "
                                 f"block sizes {list(self.block_sizes)}")
        return h


def level_sizes(image_size: int, levels: int) -> list[int]:
    """image_size / 2**level (floored) for each of `levels` U-Net levels."""
    return [image_size // 2 ** level for level in range(levels)]
