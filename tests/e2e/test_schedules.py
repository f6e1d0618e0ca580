"""`defectops serve` against a real Prefect server (started by the test session on a free port): one cron
deployment per product line, and the server's scheduler creates SCHEDULED flow runs for them. The slow test
also triggers a run of the served deployment and waits for the serving process to execute the retrain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import tracking
from flows.retrain import model_name
from flows.schedules import deployment_name
from infra.services import env_for_clients
from tests.e2e._pipeline import small_demo_line, write_params

CRONS = {"sched-a": "17 4 * * *", "sched-b": "45 23 * * 0"}


@pytest.fixture
def serving(services, tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`defectops serve` in its own process group, with the services' client environment."""
    lines = {name: {"data": small_demo_line(tmp_path / "line") if name == "sched-a" else tmp_path / name,
                    "cron": cron, "max_train_images": 6} for name, cron in CRONS.items()}
    params = write_params(tmp_path / "params.yaml", tmp_path / "root", lines)
    env = {**os.environ, **env_for_clients(services), "TMPDIR": str(tmp_path)}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "defectops"), "serve", "--config", str(params)],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, tmp_path / "serve.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def _wait_for(what: str, probe, proc: subprocess.Popen, log: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        assert proc.poll() is None, f"defectops serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(1.0)
    raise AssertionError(f"no {what} after {timeout:.0f} s; serve log:\n{log.read_text()[-3000:]}")


def _deployment(client, line: str):
    try:
        return client.read_deployment_by_name(f"retrain/{deployment_name(line)}")
    except Exception:  # noqa: BLE001 - not registered yet (ObjectNotFound)
        return None


def _scheduled_runs(client, deployment_id):
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))


def test_serve_creates_scheduled_runs(services, serving):
    proc, log = serving
    with temporary_settings(updates={PREFECT_API_URL: services.prefect_api_url}), get_client(sync_client=True) as client:
        for line, cron in CRONS.items():
            dep = _wait_for(f"deployment {deployment_name(line)}", lambda line=line: _deployment(client, line), proc, log)
            assert [s.schedule.cron for s in dep.schedules] == [cron] and all(s.active for s in dep.schedules)
            assert dep.parameters["product_line"] == line
            runs = _wait_for(f"SCHEDULED run of {dep.name}", lambda dep=dep: _scheduled_runs(client, dep.id), proc, log)
            minute, hour, *_ = cron.split()
            for run in runs:
                assert run.state.type == StateType.SCHEDULED and run.parameters["product_line"] == line
                start = run.expected_start_time
                assert (start.minute, start.hour) == (int(minute), int(hour)), start
                assert start.timestamp() > time.time()


@pytest.mark.slow
def test_served_deployment_runs_a_retrain(services, serving):
    """A run of the served deployment, created now, is executed by the serving process to completion and
    registers a model version (the served runs see the object store and MLflow)."""
    from prefect.deployments import run_deployment

    proc, log = serving
    with temporary_settings(updates={PREFECT_API_URL: services.prefect_api_url}), get_client(sync_client=True) as client:
        _wait_for("deployment", lambda: _deployment(client, "sched-a"), proc, log)
        run = run_deployment(f"retrain/{deployment_name('sched-a')}", timeout=600)
    assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
    tracking.configure(services.mlflow_uri)
    assert tracking.version_for_alias(model_name("sched-a"), "champion") is not None
