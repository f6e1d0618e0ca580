"""`services.database: postgresql` (issue 16): MLflow's backend store and Prefect's database on a local
PostgreSQL cluster under the services root, started, checked and stopped with the other services.

What a user relies on: the registry and the flow runs are in PostgreSQL (not in SQLite files), they survive a
restart, nobody connects without the password, no password is on a command line, and a root that keeps its
registry in one database is never started on the other (that would show an empty registry).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from infra import postgres
from infra.credentials import service_secrets
from infra.services import ALL_SERVICES, ServiceStartError, env_for_clients, start, status, stop

pytestmark = pytest.mark.services


def _psql(port: int, database: str, sql: str, password: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run([postgres.binary("psql"), "-X", "-w", "-h", "127.0.0.1", "-p", str(port), "-U",
                           postgres.DB_USER, "-d", database, "-tA", "-c", sql], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def _cmdline(pid: int) -> str:
    return " ".join(Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
                    for child in [pid, *_children(pid)] if Path(f"/proc/{child}/cmdline").exists())


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(entry.name)) == pid:
                out.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return out


def test_postgresql_holds_the_registry_and_flow_runs_and_keeps_them(isolated_services, monkeypatch):
    cfg = isolated_services(ALL_SERVICES, database="postgresql")
    state = start(cfg)
    assert set(state.launched) == {*ALL_SERVICES, "postgres"}
    assert all(st.alive and st.healthy for st in status(cfg)), status(cfg)
    assert [st.name for st in status(cfg)] == ["seaweedfs", "postgres", "mlflow", "prefect"]
    port = postgres.port_of(cfg.root / "postgres")
    password = service_secrets(cfg.root)["postgres_password"]

    for name, value in env_for_clients(state).items():
        monkeypatch.setenv(name, value)
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(state.mlflow_uri)
    with mlflow.start_run() as run:
        mlflow.log_metric("auroc", 0.9)
    client = MlflowClient(state.mlflow_uri, registry_uri=state.mlflow_uri)  # not an earlier test's registry
    client.create_registered_model("pg-line")
    version = client.create_model_version("pg-line", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("pg-line", "champion", version.version)

    from prefect import flow, get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    # Prefect keeps the settings it read first in this process: point it at this root's server explicitly.
    prefect_here = temporary_settings(updates={PREFECT_API_URL: state.prefect_api_url,
                                               PREFECT_API_AUTH_STRING: state.prefect_auth})

    @flow(name="pg-probe")
    def probe() -> int:
        return 7

    with prefect_here:
        assert probe() == 7

    # The records are rows of the cluster, and no SQLite database was made beside it.
    models = _psql(port, "mlflow", "SELECT name FROM registered_models", password)
    assert models.returncode == 0 and "pg-line" in models.stdout.split(), models.stderr
    flows = _psql(port, "prefect", "SELECT name FROM flow", password)
    assert flows.returncode == 0 and "pg-probe" in flows.stdout.split(), flows.stderr
    assert not list(cfg.root.rglob("mlflow.db")) and not list(cfg.root.rglob("prefect.db"))

    # Nobody connects without the password, or with a wrong one; it is on no command line.
    for attempt in (None, "wrong-password"):
        refused = _psql(port, "mlflow", "SELECT 1", attempt)
        assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
    for name, pid in state.pids.items():
        assert password not in _cmdline(pid), name
    assert (cfg.root / "postgres").stat().st_mode & 0o077 == 0

    # Stopped last but one (before SeaweedFS), after the servers that use it; everything kept on restart.
    assert stop(cfg) == ["prefect", "mlflow", "postgres", "seaweedfs"]
    assert not any(st.alive for st in status(cfg))
    start(cfg)
    assert client.get_model_version_by_alias("pg-line", "champion").version == version.version
    assert client.get_run(run.info.run_id).data.metrics["auroc"] == 0.9

    import asyncio

    async def flow_names() -> list[str]:
        async with get_client() as prefect:
            return [f.name for f in await prefect.read_flows()]

    with temporary_settings(updates={PREFECT_API_URL: state.prefect_api_url,
                                     PREFECT_API_AUTH_STRING: state.prefect_auth}):
        assert "pg-probe" in asyncio.run(flow_names())

    # The same root on SQLite would show an empty registry: refused, naming the cluster, nothing started.
    stop(cfg)
    with pytest.raises(ServiceStartError, match=r"PostgreSQL .*services.database: postgresql"):
        start(replace(cfg, database="sqlite"))
    assert not any(st.alive for st in status(cfg))
    assert not list(cfg.root.rglob("mlflow.db"))


def test_a_sqlite_root_is_not_started_on_postgresql(isolated_services):
    cfg = isolated_services(("seaweedfs", "mlflow"))
    cfg = replace(cfg, database="sqlite")
    start(cfg)
    stop(cfg)
    assert (cfg.root / "mlflow" / "mlflow.db").is_file()
    with pytest.raises(ServiceStartError, match=r"SQLite .*mlflow\.db.*services.database: sqlite"):
        start(replace(cfg, database="postgresql"))
    assert not (cfg.root / "postgres").exists()
