"""What some detectors can do beyond the Detector protocol, each declared as a small runtime-checkable
protocol: callers ask `isinstance(detector, Updatable)` instead of probing attributes by name.

- Updatable: `update` adds new good images to a fitted model (PatchCore).
- FeatureCached: `feature_key` / `extract` / `fit_features`: patch embeddings that can be extracted once,
  cached and fitted from (PatchCore).
- MultiLine: `for_line` gives the view of a model serving several product lines with one line's threshold
  (Dinomaly, unified models).
- StepTrained: `fit` runs optimiser steps, reports each to `log_step` and resumes from / writes checkpoints
  in `checkpoint_dir` (the torch-trained methods). Every detector has a `fit`, and isinstance checks names,
  not signatures: the capability is declared by the class attribute `trains_in_steps = True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from components.detector import ImageInput, ProgressFn
from components.type_aliases import LogStepFn


@runtime_checkable
class Updatable(Protocol):
    def update(self, images: ImageInput, progress: ProgressFn | None = None,
               lineage: dict | None = None) -> Any: ...


@runtime_checkable
class FeatureCached(Protocol):
    def feature_key(self) -> dict:
        """What the patch embeddings depend on besides the images (a feature cache key)."""

    def extract(self, images: ImageInput, progress: ProgressFn | None = None) -> torch.Tensor:
        """Patch embeddings of every image -> (N_images * h * w, D)."""

    def fit_features(self, features: torch.Tensor, progress: ProgressFn | None = None) -> Any:
        """Fit from embeddings that `extract` gave (N, D) -> self."""


@runtime_checkable
class MultiLine(Protocol):
    def for_line(self, line: str) -> Any:
        """A view of the model carrying `line`'s calibrated threshold."""


@runtime_checkable
class StepTrained(Protocol):
    trains_in_steps: ClassVar[Literal[True]]

    def fit(self, images: ImageInput, progress: ProgressFn | None = None, log_step: LogStepFn | None = None,
            checkpoint_dir: str | Path | None = None) -> Any: ...
