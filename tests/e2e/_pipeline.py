"""Helpers shared by the pipeline end-to-end tests (retrain, failures, schedules): params files, a small demo
line, a client session on the test's services, and the git commit to compare lineage against."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from components.config import load_config
from flows.demo_data import DemoSpec, build_demo_line
from flows.ops_cli import client_session

SMALL_DEMO = DemoSpec(texture="brick", n_train=6, n_test_good=4, n_per_defect=2, size=96, seed=0)
# The gate's latency budget is not under test here, and two shared cores under load can make a 64 px image
# take hundreds of ms: a generous budget keeps the tests about AUROC/AUPRO.
TEST_PROMOTION = {"latency_budget_ms": 60000, "max_false_reject_rate": None,
                  "max_escape_rate": None}  # tiny lines: AUROC gate only


def write_params(path: Path, root: Path, lines: dict[str, dict[str, Any]], image_size: int = 64,
                 patchcore: dict[str, Any] | None = None) -> Path:
    """A params.yaml for the tests: small images, services.root under the test's tmp dir."""
    raw = {"data": {"image_size": [image_size, image_size], "batch_size": 8},
           "detector": {"patchcore": {"coreset_ratio": 0.1, **(patchcore or {})}},
           "promotion": TEST_PROMOTION, "services": {"root": str(root)},
           "lines": {name: {"cron": "0 3 * * *", **spec, "data": str(spec["data"])} for name, spec in lines.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def small_demo_line(folder: Path) -> Path:
    return build_demo_line(folder, SMALL_DEMO)


@contextmanager
def session(params: Path, env: dict[str, str]) -> Iterator[None]:
    """Flows in this process talk to the test's services (Prefect settings included)."""
    with client_session(load_config(params), dict(env)):
        yield


def git_head(folder: Path) -> str:
    """`git rev-parse HEAD` of `folder`, or "none" when it has no commit (as flows.versioning records)."""
    out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                         text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "none"


def tiny_git_repo(folder: Path) -> str:
    """A one-commit repository standing in for the code checkout; returns its commit."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README").write_text("code version stand-in\n")
    ident = ["-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "README"], [*ident, "commit", "-q", "-m", "code"]):
        subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)
    return git_head(folder)
