"""Uninformed Students' typed, frozen hyperparameters (the `detector.students` section of params.yaml).

Bergmann et al., "Uninformed Students: Student-Teacher Anomaly Detection with Discriminative Latent
Embeddings" (CVPR 2020). The paper's configuration: teachers for patch sizes 17, 33 and 65 distilled from
a pretrained ResNet-18 on 500 000 ImageNet patches (decoder, triplet and compactness losses, lambda 1 each,
128-d descriptors), an ensemble of M = 3 students per scale trained for 100 epochs with Adam (lr 1e-4,
weight decay 1e-5), score = normalised regression error + normalised predictive variance, averaged over
scales. The defaults here are sized for 2 CPU cores; params.yaml writes the paper's values in [brackets].

This module imports nothing from components.config (which imports it): no cycle.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]

TEACHER_FIELDS = ("patch_sizes", "channels", "descriptor_dim", "leaky_slope", "teacher_patches",
                  "teacher_iterations", "teacher_batch_size", "teacher_lr", "teacher_weight_decay",
                  "distill_size", "triplet_margin", "weight_distill", "weight_triplet", "weight_compact",
                  "positive_shift", "positive_noise", "teacher_seed")
"""The fields that shape the teacher (with the backbone's name and weights: the teacher cache key)."""


class StudentsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # ---- patch networks (teacher and students share the architecture)
    patch_sizes: tuple[PositiveInt, ...] = (17, 33)
    channels: PositiveInt = 32
    descriptor_dim: PositiveInt = 128
    leaky_slope: NonNegativeFloat = 0.005
    # ---- teacher (distilled from the backbone section's pretrained network; trained once, cached)
    teacher_patches: PositiveInt = 4000
    teacher_iterations: PositiveInt = 500
    teacher_batch_size: PositiveInt = 64
    teacher_lr: PositiveFloat = 2e-4
    teacher_weight_decay: NonNegativeFloat = 1e-5
    distill_size: PositiveInt = 64
    triplet_margin: PositiveFloat = 1.0
    weight_distill: NonNegativeFloat = 1.0
    weight_triplet: NonNegativeFloat = 1.0
    weight_compact: NonNegativeFloat = 1.0
    positive_shift: NonNegativeInt = 2
    positive_noise: NonNegativeFloat = 0.02
    teacher_seed: int = 0
    teacher_cache: bool = True
    # ---- students
    num_students: Annotated[int, Field(ge=2)] = 3
    iterations: PositiveInt = 300
    batch_size: PositiveInt = 4
    crop_size: PositiveInt = 48
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-5
    seed: int = 0
    checkpoint_every: NonNegativeInt = 0
    stats_max_images: PositiveInt = 16
    # ---- scoring and runtime
    smoothing_sigma: NonNegativeFloat = 4.0
    top_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: NonNegativeInt = 0

    @model_validator(mode="after")
    def _consistent(self) -> StudentsConfig:
        sizes = list(self.patch_sizes)
        if not sizes:
            raise ValueError("patch_sizes must name at least one patch size")
        if sizes != sorted(set(sizes)):
            raise ValueError(f"patch_sizes must be strictly increasing, got {sizes}")
        if any(p < 3 or p % 2 == 0 for p in sizes):
            raise ValueError(f"patch_sizes must be odd and >= 3 (a centre pixel), got {sizes}")
        if self.teacher_batch_size < 2:
            raise ValueError("teacher_batch_size must be >= 2 (negatives and correlations come from the batch)")
        return self

    def teacher_fields(self) -> dict:
        """The teacher-shaping hyperparameters as JSON-ready values (part of the teacher cache key)."""
        return self.model_dump(mode="json", include=set(TEACHER_FIELDS))
