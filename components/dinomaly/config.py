"""Dinomaly's typed, frozen hyperparameters (the `detector.dinomaly` section of params.yaml).

Defaults are the paper's configuration (Guo et al., "Dinomaly: The Less Is More Philosophy in
Multi-Class Unsupervised Anomaly Detection"): frozen DINOv2 ViT-B/14 with 4 register tokens, middle
layers 2-9 as targets, noisy MLP bottleneck with dropout 0.2, 8 linear-attention decoder blocks, 2 layer
groups, loose loss with hard-point mining (p 0.9, factor 0.1), AdamW-family optimiser with lr 2e-3 ->
2e-4 (warm-up 100 steps, cosine decay), 10 000 iterations of batch 16, Gaussian smoothing sigma 4 and
image score = mean of the top 1 % of map values.

`encoder: cnn-variant` replaces the ViT by an offline ImageNet CNN (`backbone.name`), its intermediate
stages flattened into tokens. It is a variant, not the paper's method: its figures are labelled as such.

This module imports nothing from components.config (which imports it): no cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from components.method_config import TrainedMethodConfig
from components.type_aliases import Fraction, NonNegativeInt, PositiveFloat, PositiveInt

ENCODERS = ("vit", "cnn-variant")


class DinomalyConfig(TrainedMethodConfig):
    """seed, threads, smoothing_sigma, checkpoint_every, device: components.method_config."""

    # ---- encoder
    # Defaults are the CPU-sized ones params.yaml ships (tests/unit/components/test_config.py checks they agree); the
    # paper's: encoder vit (DINOv2 weights), cnn_token_level 1, iterations 10000, batch 16, warm-up 100.
    encoder: Literal["vit", "cnn-variant"] = "cnn-variant"
    vit_name: str = "vit_base_patch14_reg4_dinov2"
    vit_weights: Literal["auto", "file", "hub", "random"] = "auto"
    vit_weights_file: Path | None = None
    target_layers: tuple[NonNegativeInt, ...] = (2, 3, 4, 5, 6, 7, 8, 9)
    cnn_layers: tuple[NonNegativeInt, ...] = (1, 2, 3)
    cnn_token_level: NonNegativeInt = 2
    cnn_normalize_levels: bool = True
    # blocks: each stage in its own channel block (default, as before: a group mean is a concatenation) |
    # shared: every stage mapped into the same channels by a fixed isometry (groups overlap, as the paper's)
    cnn_embedding: Literal["blocks", "shared"] = "blocks"
    # ViT: drop = CLS/register tokens dropped before the bottleneck (default, as before) | decode = passed
    # through bottleneck and decoder and stripped at the output (the official ViTill)
    vit_prefix_tokens: Literal["drop", "decode"] = "drop"
    # ---- bottleneck and decoder
    num_groups: PositiveInt = 2
    decoder_depth: PositiveInt = 8
    num_heads: PositiveInt | Literal["auto"] = "auto"
    mlp_ratio: PositiveFloat = 4.0
    bottleneck_ratio: PositiveFloat = 4.0
    bottleneck_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    # ---- loose loss
    mining_quantile: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    mining_factor: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    mining_ramp: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    # ---- optimisation
    iterations: PositiveInt = 150
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 2e-3
    final_lr: Annotated[float, Field(ge=0.0)] = 2e-4
    warmup_steps: NonNegativeInt = 15
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-10
    amsgrad: bool = True
    grad_clip_norm: Annotated[float, Field(ge=0.0)] = 0.1
    seed: int = 1
    cache_features: bool = True
    cache_max_mb: PositiveInt = 4096
    # ---- scoring
    top_ratio: Fraction = 0.01

    @model_validator(mode="after")
    def _consistent(self) -> DinomalyConfig:
        if self.vit_weights == "file" and self.vit_weights_file is None:
            raise ValueError("vit_weights: 'file' needs vit_weights_file")
        layers = self.target_layers if self.encoder == "vit" else self.cnn_layers
        name = "target_layers" if self.encoder == "vit" else "cnn_layers"
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"{name} must be strictly increasing, got {list(layers)}")
        if len(layers) < self.num_groups:
            raise ValueError(f"num_groups {self.num_groups} needs at least as many {name} (got {len(layers)})")
        if self.decoder_depth < self.num_groups:
            raise ValueError(f"num_groups {self.num_groups} needs decoder_depth >= num_groups")
        if self.cnn_token_level >= len(self.cnn_layers):
            raise ValueError(f"cnn_token_level {self.cnn_token_level} indexes cnn_layers {list(self.cnn_layers)}")
        if self.final_lr > self.lr:
            raise ValueError(f"final_lr {self.final_lr} must not exceed lr {self.lr}")
        if self.warmup_steps >= self.iterations:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below iterations {self.iterations}")
        return self

    @property
    def is_variant(self) -> bool:
        """True for the CNN adapter: a variant of the paper's method, labelled so everywhere."""
        return self.encoder == "cnn-variant"


def split_groups(count: int, num_groups: int) -> list[list[int]]:
    """Contiguous, as-even-as-possible groups of range(count): (8, 2) -> [[0..3], [4..7]]; (3, 2) -> [[0, 1], [2]]."""
    if not 0 < num_groups <= count:
        raise ValueError(f"cannot split {count} layers into {num_groups} groups")
    base, extra = divmod(count, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups
