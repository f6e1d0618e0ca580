"""`defectops serve` against a real Prefect server (started by the test session on a free port): one cron
deployment per product line, in the line's timezone, plus a scheduled inference deployment where a line has
`inference:`, and the server's scheduler creates SCHEDULED flow runs for them. `serve --detach` runs as a
managed service that `status` lists and `down` stops quickly and cleanly. The slow test also triggers runs of
the served deployments and waits for the serving process to execute the retrain and then the inference."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
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

from flows import registry, tracking
from flows.retrain import model_name
from flows.schedules import deployment_name, inference_deployment_name
from infra import process
from infra.scheduler import schedules_status, stop_schedules
from infra.services import ALL_SERVICES, env_for_clients
from tests.e2e._pipeline import small_demo_line, write_params

CRONS = {"sched-a": "17 4 * * *", "sched-b": "45 23 * * 0"}
TIMEZONES = {"sched-a": "Europe/Berlin", "sched-b": "UTC"}
INFERENCE_CRON = "5 6 * * 1-5"  # sched-a only


def schedule_params(tmp_path: Path) -> Path:
    """Two lines on their own crons and timezones; sched-a also scores its test images on INFERENCE_CRON."""
    line_a = small_demo_line(tmp_path / "line")
    lines = {name: {"data": line_a if name == "sched-a" else tmp_path / name, "cron": cron,
                    "timezone": TIMEZONES[name], "max_train_images": 6} for name, cron in CRONS.items()}
    lines["sched-a"]["inference"] = {"cron": INFERENCE_CRON, "images": [str(line_a / "test")]}
    return write_params(tmp_path / "params.yaml", tmp_path / "root", lines)


@pytest.fixture
def serving(services, tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`defectops serve` in its own process group, with the services' client environment."""
    params = schedule_params(tmp_path)
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


def _deployment(client, line: str, flow: str = "retrain"):
    name = deployment_name(line) if flow == "retrain" else inference_deployment_name(line)
    try:
        return client.read_deployment_by_name(f"{flow}/{name}")
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
            _check_scheduled(client, dep, cron, TIMEZONES[line], proc, log)
            assert dep.parameters["product_line"] == line
        dep = _wait_for("inference deployment", lambda: _deployment(client, "sched-a", "inference"), proc, log)
        assert dep.parameters["product_line"] == "sched-a" and dep.parameters["images"][0].endswith("test")
        _check_scheduled(client, dep, INFERENCE_CRON, TIMEZONES["sched-a"], proc, log)
        assert _deployment(client, "sched-b", "inference") is None  # no `inference:` on sched-b


def _check_scheduled(client, dep, cron: str, tz: str, proc, log) -> None:
    """The deployment runs on `cron` in `tz`: its SCHEDULED runs start at that local minute and hour."""
    from zoneinfo import ZoneInfo

    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [(cron, tz)]
    assert all(s.active for s in dep.schedules)
    runs = _wait_for(f"SCHEDULED run of {dep.name}", lambda: _scheduled_runs(client, dep.id), proc, log)
    minute, hour, *_ = cron.split()
    for run in runs:
        assert run.state.type == StateType.SCHEDULED
        start = run.expected_start_time.astimezone(ZoneInfo(tz))
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
        assert registry.version_for_alias(model_name("sched-a"), "champion") is not None
        # The scheduled inference scores the line's test images with the champion just registered.
        run = run_deployment(f"inference/{inference_deployment_name('sched-a')}", timeout=600)
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
    import mlflow

    client = mlflow.MlflowClient(services.mlflow_uri)
    experiment = client.get_experiment_by_name("defectops/sched-a")
    [scored] = client.search_runs([experiment.experiment_id], "tags.kind = 'inference'")
    assert scored.data.tags["model_version"] == registry.version_for_alias(model_name("sched-a"), "champion")
    assert scored.data.metrics["n_images"] > 0 and scored.data.tags["results_uri"].startswith("s3://")


def test_prefect_ui_settings_report_the_configured_port(services):
    """The UI asks /ui-settings where the API is: the server's own port, not Prefect's default 4200."""
    base = services.prefect_api_url.removesuffix("/api")
    assert not base.endswith(":4200")
    with urllib.request.urlopen(f"{base}/ui-settings", timeout=10) as resp:
        assert json.loads(resp.read())["api_url"] == services.prefect_api_url


def _cli(*args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [str(Path(sys.executable).parent / "defectops"), *args]
    return subprocess.run(argv, env={**env, "COLUMNS": "200"}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


class _Alive:
    """The `proc.poll()` of _wait_for for a process this test did not start."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self):
        return None if process.is_alive(self.pid) else -1


def test_detached_serve_is_listed_and_stopped_quickly(services, tmp_path):
    """`serve --detach` returns once its runner is healthy; `status` lists it; `serve --detach` again reuses
    it; `down` stops it in seconds while Prefect is up (its schedules are paused, no traceback logged)."""
    params = write_params(tmp_path / "params.yaml", tmp_path / "root",
                          {"managed-a": {"data": tmp_path / "a", "cron": "30 2 * * *", "timezone": "Asia/Tokyo"}})
    env = {**os.environ, **env_for_clients(services), "TMPDIR": str(tmp_path)}
    root = tmp_path / "root"
    try:
        out = _cli("serve", "--detach", "--config", str(params), env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        runner = schedules_status(root)
        assert runner.alive and runner.healthy, runner
        shown = _cli("status", "--config", str(params), env=env, cwd=tmp_path)
        assert re.search(rf"schedules\s.*{runner.pid}\s.*True\s.*True", shown.stdout), shown.stdout
        again = _cli("serve", "--detach", "--config", str(params), env=env, cwd=tmp_path)
        assert again.returncode == 0 and schedules_status(root).pid == runner.pid, again.stdout + again.stderr
        with temporary_settings(updates={PREFECT_API_URL: services.prefect_api_url}), \
                get_client(sync_client=True) as client:
            dep = _wait_for("deployment", lambda: _deployment(client, "managed-a"), _Alive(runner.pid),
                            root / "logs" / "schedules.log")
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == \
                [("30 2 * * *", "Asia/Tokyo", True)] and not dep.paused
            t0 = time.monotonic()
            down = _cli("down", "--config", str(params), env=env, cwd=tmp_path)
            seconds = time.monotonic() - t0
            print(f"defectops down with a detached runner: {seconds:.1f} s")
            assert down.returncode == 0 and "schedules" in down.stdout, down.stdout + down.stderr
            assert seconds < 30
            assert not process.is_alive(runner.pid) and schedules_status(root) is None
            # Stopped while Prefect was up: the runner paused its deployment on the way out.
            assert _deployment(client, "managed-a").paused
        assert "Traceback" not in (root / "logs" / "schedules.log").read_text()
    finally:
        stop_schedules(root)


@pytest.mark.slow
def test_up_starts_the_runner_and_down_stops_it_first(isolated_services, tmp_path):
    """`services.schedules: true`: `up` starts the runner after the servers; `down` stops it first, while
    Prefect still answers, so the whole stack goes down in seconds with no traceback in the runner's log."""
    cfg = isolated_services(ALL_SERVICES)  # its root and free ports; cleaned up by the fixture
    params = write_params(tmp_path / "params.yaml", cfg.root, {"managed-b": {"data": tmp_path / "b"}})
    raw = yaml.safe_load(params.read_text())
    raw["services"].update(s3_port=cfg.s3_port, mlflow_port=cfg.mlflow_port, prefect_port=cfg.prefect_port,
                           bucket=cfg.bucket, start_timeout_s=240, schedules=True)
    raw["service"] = {"autostart": False}  # the inference service has its own tests
    params.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DEFECTOPS_", "MLFLOW_", "PREFECT_"))}
    env["TMPDIR"] = str(tmp_path)
    up = _cli("up", "--config", str(params), env=env, cwd=tmp_path, timeout=600)
    assert up.returncode == 0 and "schedules: runner pid" in up.stdout, up.stdout + up.stderr
    runner = schedules_status(cfg.root)
    assert runner.alive and runner.healthy
    shown = _cli("status", "--config", str(params), env=env, cwd=tmp_path)
    assert re.search(rf"schedules\s.*{runner.pid}\s.*True\s.*True", shown.stdout), shown.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{cfg.prefect_port}/ui-settings", timeout=10) as resp:
        assert json.loads(resp.read())["api_url"] == f"http://127.0.0.1:{cfg.prefect_port}/api"
    t0 = time.monotonic()
    down = _cli("down", "--config", str(params), env=env, cwd=tmp_path)
    seconds = time.monotonic() - t0
    print(f"defectops down (runner, Prefect, MLflow, SeaweedFS): {seconds:.1f} s")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: schedules, prefect, mlflow, seaweedfs" in down.stdout, down.stdout
    assert seconds < 60 and not process.is_alive(runner.pid)
    assert "Traceback" not in (cfg.root / "logs" / "schedules.log").read_text()
