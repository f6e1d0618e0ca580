"""Divide-and-Assemble (Hou et al., ICCV 2021): a U-Net whose skip connections pass through multi-scale
block-wise memories, trained adversarially with a feature-alignment loss.

This package's __init__ imports nothing eagerly: components.config imports
components.divide_assemble.config, and the detector imports components.config, so an eager import here
would be a cycle. The detector registers itself when components.divide_assemble.detector is imported
(components.detector._import_builtin).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DivideAssemble", "DivideAssembleConfig"]


def __getattr__(name: str) -> Any:
    if name == "DivideAssemble":
        from components.divide_assemble.detector import DivideAssemble

        return DivideAssemble
    if name == "DivideAssembleConfig":
        from components.divide_assemble.config import DivideAssembleConfig

        return DivideAssembleConfig
    raise AttributeError(f"module 'components.divide_assemble' has no attribute {name!r}")
