"""PatchCore: locally aware patch features, greedy coreset, faiss nearest-neighbour scoring.

This package's __init__ imports nothing eagerly: components.config imports components.patchcore.config,
and the detector imports components.config, so an eager import here would be a cycle. The detector
registers itself when components.patchcore.detector is imported (components.detector._import_builtin).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PatchCore", "PatchCoreConfig"]


def __getattr__(name: str) -> Any:
    if name == "PatchCore":
        from components.patchcore.detector import PatchCore

        return PatchCore
    if name == "PatchCoreConfig":
        from components.patchcore.config import PatchCoreConfig

        return PatchCoreConfig
    raise AttributeError(f"module 'components.patchcore' has no attribute {name!r}")
