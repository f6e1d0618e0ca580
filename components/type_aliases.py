"""The type aliases shared across components: constrained pydantic field types of the config sections and
the training callback's signature (one definition each).

This module imports only pydantic and the standard library: every config module may import it (no cycle
with components.config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import BeforeValidator, Field


def _not_bool(value: object) -> object:
    """YAML `true` is not a count: pydantic would read it as 1 (`batch_size: true` -> 1)."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, not a boolean")
    return value


PositiveInt = Annotated[int, BeforeValidator(_not_bool), Field(gt=0)]
NonNegativeInt = Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
"""A share in (0, 1] (e.g. coreset_ratio, top_ratio)."""

LogStepFn = Callable[[int, dict[str, float]], None]
"""log_step(step, metrics): called by a detector that trains in optimiser steps after every step (1-based)
with that step's metrics (loss, lr, ...; each method's `fit` docstring names them)."""
