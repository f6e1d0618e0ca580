"""Dinomaly: a frozen encoder's middle layers reconstructed by a noisy bottleneck and a linear-attention
decoder; one model can serve many product lines (components.dinomaly.unified).

This package's __init__ imports nothing eagerly: components.config imports components.dinomaly.config,
and the detector imports components.config, so an eager import here would be a cycle. The detector
registers itself when components.dinomaly.detector is imported (components.detector._import_builtin).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Dinomaly", "DinomalyConfig", "fit_unified"]


def __getattr__(name: str) -> Any:
    if name == "Dinomaly":
        from components.dinomaly.detector import Dinomaly

        return Dinomaly
    if name == "DinomalyConfig":
        from components.dinomaly.config import DinomalyConfig

        return DinomalyConfig
    if name == "fit_unified":
        from components.dinomaly.unified import fit_unified

        return fit_unified
    raise AttributeError(f"module 'components.dinomaly' has no attribute {name!r}")
