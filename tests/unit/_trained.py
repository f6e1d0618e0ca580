"""Helpers shared by the tests of the trained detectors (dinomaly, students, transformaly, divide_assemble):
their tiny config, fitting interrupted then resumed from a checkpoint, comparing trained weights.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from components.config import Config, validate
from tests.conftest import TINY_METHOD_PARAMS, TINY_PARAMS


def tiny_method_cfg(method: str, services_root: Path | None = None, **section) -> Config:
    """conftest's tiny config (random test_resnet, 64 px) with detector.method = method, that method's tiny
    section from TINY_METHOD_PARAMS updated by `section`, and services.root = services_root if given."""
    raw = copy.deepcopy(TINY_PARAMS)
    raw["detector"]["method"] = method
    raw["detector"][method] = {**TINY_METHOD_PARAMS[method], **section}
    if services_root is not None:
        raw["services"] = {"root": str(services_root)}
    return validate(raw, source=f"tiny_method_cfg({method!r})")


class Interrupted(Exception):
    """Raised from the progress callback to interrupt a fit."""


def fit_interrupted_then_resumed(make: Callable[[], object], images: torch.Tensor, checkpoint_dir: Path,
                                 stop_at: int = 3) -> tuple[object, list[int], int]:
    """Fit make() on images with checkpoints in checkpoint_dir, interrupted when training step `stop_at`
    is done; then fit a fresh make() that resumes from there.

    -> (the resumed detector, the steps its run logged, the step of the checkpoint the interruption left)."""

    def stop(stage: str, done: int, total: int | None) -> None:
        if stage == "train" and done == stop_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        make().fit(images, progress=stop, checkpoint_dir=checkpoint_dir)
    left = json.loads((checkpoint_dir / "checkpoint.json").read_text())["step"]
    steps: list[int] = []
    resumed = make().fit(images, log_step=lambda s, m: steps.append(s), checkpoint_dir=checkpoint_dir)
    return resumed, steps, left


def logged_steps(detector, images: torch.Tensor, **fit_options) -> list[int]:
    """The steps detector.fit(images, **fit_options) logs."""
    steps: list[int] = []
    detector.fit(images, log_step=lambda s, m: steps.append(s), **fit_options)
    return steps


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    """Every tensor of a's and b's state dicts equal to the bit, in the same order."""
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
