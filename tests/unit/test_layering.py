"""The package's import arrows, read from the source (every import, lazy ones inside functions included):

- components/ imports none of prefect, mlflow, boto3, dvc and nothing of flows/ or infra/;
- infra/ (services, object store client, locks, fault points) imports nothing of flows/, nor of components/
  (whose import pulls in torch: `defectops up` and the object store client stay light);
- the leaf flows (retrain, retrain-unified, inference, monitor) import the shared steps, never each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEAF_FLOWS = ("flows.retrain", "flows.unified", "flows.inference", "flows.monitor")


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` statement anywhere in the file names (absolute)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_the_scanner_sees_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from flows import retrain\n    import mlflow.tracking\n")
    assert {"flows", "flows.retrain", "mlflow.tracking"} <= imported_modules(probe)


def test_components_stay_free_of_the_pipeline() -> None:
    assert offending("components", ("prefect", "mlflow", "boto3", "botocore", "dvc", "flows", "infra")) == {}


def test_infra_imports_neither_the_flows_nor_the_components() -> None:
    assert offending("infra", ("flows", "components")) == {}


@pytest.mark.parametrize("leaf", LEAF_FLOWS)
def test_leaf_flows_do_not_import_each_other(leaf: str) -> None:
    path = ROOT / (leaf.replace(".", "/") + ".py")
    others = tuple(m for m in LEAF_FLOWS if m != leaf)
    imports = imported_modules(path)
    assert sorted(m for m in imports if any(m == o or m.startswith(o + ".") for o in others)) == []
    if leaf != "flows.monitor":  # the monitor reads decisions and starts a deployment: no shared step
        assert "flows.steps" in imports
