"""Uninformed Students (Bergmann et al., CVPR 2020): a teacher patch-descriptor network distilled from a
pretrained backbone, and an ensemble of students regressing its descriptors on good images; anomaly =
regression error + predictive variance, densely for every pixel.

This package's __init__ imports nothing eagerly: components.config imports components.students.config,
and the detector imports components.config, so an eager import here would be a cycle. The detector
registers itself when components.students.detector is imported (components.detector._import_builtin).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Students", "StudentsConfig"]


def __getattr__(name: str) -> Any:
    if name == "Students":
        from components.students.detector import Students

        return Students
    if name == "StudentsConfig":
        from components.students.config import StudentsConfig

        return StudentsConfig
    raise AttributeError(f"module 'components.students' has no attribute {name!r}")
