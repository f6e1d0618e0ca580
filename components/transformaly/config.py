"""Transformaly's typed, frozen hyperparameters (the `detector.transformaly` section of params.yaml).

Defaults are the paper's configuration (Cohen and Avidan, "Transformaly - Two (Feature Spaces) Are Better
Than One", CVPRW 2022): ImageNet ViT-B/16 at 384 px as teacher; agnostic features = its final CLS token,
PCA keeping 90 % of the variance, one Gaussian; fine-tuned features = for blocks 2-11 a student copy of each
teacher block, fed the teacher's input to that block and trained (Adam, lr 1e-4) to reproduce its output on
good images; the per-block discrepancy vector under one Gaussian. Students start as a copy of their teacher
block plus `init_noise` (relative) Gaussian noise: an exact copy has zero loss and zero gradient and would
never move (the paper's code appears to start its cloned blocks random, absent from the pretrained
checkpoint: `student_init: random`; on cookie and two digits classes the noisy copy scored slightly higher). Image score = sum of the two negative
log-likelihoods.

`encoder: cnn-variant` replaces the ViT by an offline ImageNet CNN (`backbone.name`): its pooled
pre-logits features are the agnostic features and its stages `cnn_blocks` the fine-tuned blocks. It is a
variant, not the paper's method: its figures are labelled as such.

This module imports nothing from components.config (which imports it): no cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class TransformalyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # ---- teacher
    encoder: Literal["vit", "cnn-variant"] = "vit"
    vit_name: str = "vit_base_patch16_384"
    vit_weights: Literal["auto", "file", "hub", "random"] = "auto"
    vit_weights_file: Path | None = None
    vit_blocks: tuple[NonNegativeInt, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
    cnn_blocks: tuple[NonNegativeInt, ...] = (4, 5, 6)
    # ---- student
    student_init: Literal["copy", "random"] = "copy"
    init_noise: Annotated[float, Field(ge=0.0)] = 0.1
    # ---- Gaussians
    pca_variance: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    ridge: Annotated[float, Field(ge=0.0)] = 1e-6
    # ---- optimisation
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    seed: int = 0
    checkpoint_every: NonNegativeInt = 0
    cache_features: bool = True
    # ---- map (optional, not the paper's) and runtime
    smoothing_sigma: Annotated[float, Field(ge=0.0)] = 4.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: NonNegativeInt = 0

    @model_validator(mode="after")
    def _consistent(self) -> TransformalyConfig:
        if self.vit_weights == "file" and self.vit_weights_file is None:
            raise ValueError("vit_weights: 'file' needs vit_weights_file")
        blocks, name = self.blocks, ("vit_blocks" if self.encoder == "vit" else "cnn_blocks")
        if not blocks or list(blocks) != list(range(blocks[0], blocks[0] + len(blocks))):
            raise ValueError(f"{name} must be consecutive increasing block indices, got {list(blocks)}")
        if self.student_init == "copy" and self.init_noise == 0:
            raise ValueError("student_init: copy with init_noise 0 makes every student equal to its teacher block: "
                             "the loss and its gradient are zero and training is a no-op (use init_noise > 0)")
        return self

    @property
    def blocks(self) -> tuple[int, ...]:
        """The fine-tuned block indices of the configured encoder."""
        return self.vit_blocks if self.encoder == "vit" else self.cnn_blocks

    @property
    def is_variant(self) -> bool:
        """True for the CNN adapter: a variant of the paper's method, labelled so everywhere."""
        return self.encoder == "cnn-variant"
