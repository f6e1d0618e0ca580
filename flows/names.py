"""The registry's naming rules, in one place and free of Prefect, MLflow and boto3 (the service imports it).

    model_name("cookie")        -> "defectops-cookie"
    unified_name("plant")       -> "defectops-unified-plant"
    serving_model(cfg, "cookie") -> ("defectops-cookie", False), or (lines.cookie.serve_from, True)
"""

from __future__ import annotations

from components.config import Config


def model_name(line: str) -> str:
    """The registered model of one product line."""
    return f"defectops-{line}"


def unified_name(name: str) -> str:
    """The registered model of a unified (several lines, one Dinomaly) model."""
    return f"defectops-unified-{name}"


def serving_model(cfg: Config, line: str) -> tuple[str, bool]:
    """(registered model that serves `line`, whether it is a unified model): `lines.<line>.serve_from` when
    set, else `defectops-<line>`."""
    spec = cfg.lines.get(line)
    if spec is not None and spec.serve_from:
        return spec.serve_from, True
    return model_name(line), False
