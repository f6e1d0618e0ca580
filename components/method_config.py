"""The fields every method's config section shares, declared once: the base classes of the `detector.<method>`
sections (components/<method>/config.py).

MethodConfig (patchcore and the four trained methods): frozen, unknown keys rejected, `seed`, `threads`
(torch threads, 0 = torch's default) and `smoothing_sigma` (Gaussian smoothing of the anomaly map, input
pixels). TrainedMethodConfig (dinomaly, students, transformaly, divide_assemble) adds what a training run
needs at run time: `checkpoint_every` (steps between checkpoints, 0 = none) and `device`. A section
overrides a default by declaring the field again (dinomaly: seed 1); names and defaults are those params.yaml
ships.

This module imports nothing from components.config (which imports the sections): no cycle.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from components.type_aliases import NonNegativeFloat, NonNegativeInt


class MethodConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    smoothing_sigma: NonNegativeFloat = 4.0
    threads: NonNegativeInt = 0


class TrainedMethodConfig(MethodConfig):
    checkpoint_every: NonNegativeInt = 50
    device: Literal["auto", "cpu", "cuda"] = "auto"

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "threads", "device"})
    """Fields that do not change what a training run computes (left out of its checkpoint fingerprint)."""
