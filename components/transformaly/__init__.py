"""Transformaly (Cohen and Avidan, 2022): a pretrained network's agnostic features and a teacher-student
discrepancy vector, each under one Gaussian; image score = sum of the two negative log-likelihoods.

This package's __init__ imports nothing eagerly (components.config imports components.transformaly.config;
an eager import of the detector here would be a cycle). The detector registers itself when
components.transformaly.detector is imported (components.detector._import_builtin).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Transformaly", "TransformalyConfig"]


def __getattr__(name: str) -> Any:
    if name == "Transformaly":
        from components.transformaly.detector import Transformaly

        return Transformaly
    if name == "TransformalyConfig":
        from components.transformaly.config import TransformalyConfig

        return TransformalyConfig
    raise AttributeError(f"module 'components.transformaly' has no attribute {name!r}")
