"""infra.services against the real binaries: SeaweedFS (weed mini), MLflow server, Prefect server."""

from __future__ import annotations

import json
import socket
import stat
import time
import urllib.request
from dataclasses import replace

import boto3
import pytest

from infra import process
from infra.services import (
    ALL_SERVICES,
    PortInUseError,
    ServiceStartError,
    env_for_clients,
    start,
    status,
    stop,
)
from infra.storage import AccessDeniedError, EndpointUnreachableError, ObjectStore

pytestmark = pytest.mark.services


def _all_text_under(root) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*")
                     if p.is_file() and p.name not in ("credentials.json", "s3.json") and p.stat().st_size < 10**7)


def test_seaweedfs_start_reuse_status_stop(isolated_services, tmp_path):
    cfg = isolated_services()
    state = start(cfg)
    print(f"seaweedfs start-up (launch -> healthy + bucket): {state.startup_s['seaweedfs']} s")
    assert state.launched == ("seaweedfs",)
    [st] = status(cfg)
    assert (st.name, st.alive, st.healthy, st.url) == ("seaweedfs", True, True, f"http://127.0.0.1:{cfg.s3_port}")

    # The bucket exists and the generated keys work; they sit in 0600 files and nowhere else.
    store = ObjectStore(state.s3_endpoint, state.bucket, state.access_key, state.secret_key)
    assert store.ensure_bucket() is False
    src = tmp_path / "a.txt"
    src.write_bytes(b"payload")
    assert store.exists(store.put_file(src, "t").uri)
    for name in ("credentials.json", "seaweedfs/s3.json"):
        assert stat.S_IMODE((cfg.root / name).stat().st_mode) == 0o600
    assert json.loads((cfg.root / "credentials.json").read_text())["secret_key"] == state.secret_key
    assert state.secret_key not in _all_text_under(cfg.root)
    assert state.secret_key not in repr(state) and state.secret_key not in repr(cfg)
    env = env_for_clients(state)
    assert env["DEFECTOPS_S3_ENDPOINT"] == env["MLFLOW_S3_ENDPOINT_URL"] == state.s3_endpoint
    assert env["AWS_SECRET_ACCESS_KEY"] == state.secret_key and "MLFLOW_TRACKING_URI" not in env

    again = start(cfg)  # idempotent: the healthy instance is reused
    assert again.launched == () and again.pids == state.pids

    t0 = time.monotonic()
    assert stop(cfg) == ["seaweedfs"]
    print(f"seaweedfs stop: {time.monotonic() - t0:.1f} s")
    [st] = status(cfg)
    assert (st.pid, st.alive, st.healthy) == (None, False, False)
    assert not process.is_alive(state.pids["seaweedfs"])
    assert not (cfg.root / "pids.json").exists()
    assert stop(cfg) == []  # stopping twice is harmless


def test_taken_port_is_a_clear_error(isolated_services):
    cfg = isolated_services()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cfg.s3_port))
        squatter.listen()
        with pytest.raises(PortInUseError, match=rf"seaweedfs: port {cfg.s3_port} on 127\.0\.0\.1 .*in use"):
            start(cfg)
    assert not (cfg.root / "pids.json").exists()
    assert status(cfg)[0].alive is False


def test_timeout_stops_the_service_and_shows_its_log(isolated_services):
    cfg = replace(isolated_services(), start_timeout_s=0.05)  # weed needs about a second to be healthy
    with pytest.raises(ServiceStartError, match=r"(?s)seaweedfs was not healthy .*Last log lines:\n.+"):
        start(cfg)
    assert not (cfg.root / "pids.json").exists()
    assert status(cfg)[0].alive is False


def test_wrong_credentials_are_rejected_by_the_server(object_store, tmp_path):
    src = tmp_path / "b.txt"
    src.write_bytes(b"x")
    for access, secret in ((object_store.access_key, "wrong-secret-123"), ("no-such-key", object_store.secret_key)):
        bad = ObjectStore(object_store.s3_endpoint, object_store.bucket, access, secret)
        with pytest.raises(AccessDeniedError) as info:
            bad.put_file(src, "t")
        message = str(info.value)
        assert object_store.s3_endpoint in message and object_store.bucket in message
        assert secret not in message and object_store.secret_key not in message
    # And straight through boto3, so the rejection is the server's and not the wrapper's.
    raw = boto3.client("s3", endpoint_url=object_store.s3_endpoint, region_name="us-east-1",
                       aws_access_key_id=object_store.access_key, aws_secret_access_key="wrong-secret-123")
    with pytest.raises(Exception, match="SignatureDoesNotMatch|Forbidden|403"):
        raw.put_object(Bucket=object_store.bucket, Key="t/raw", Body=b"x")


def test_stopped_server_fails_fast_with_storage_error(isolated_services, tmp_path):
    cfg = isolated_services()
    state = start(cfg)
    store = ObjectStore(state.s3_endpoint, state.bucket, state.access_key, state.secret_key)
    src = tmp_path / "c.txt"
    src.write_bytes(b"kept")
    stored = store.put_file(src, "t")
    stop(cfg)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=r"endpoint unreachable") as info:
        store.get_file(stored.uri, tmp_path / "out.txt", stored.sha256)
    elapsed = time.monotonic() - t0
    print(f"stopped server -> StorageError after {elapsed:.1f} s (4 attempts)")
    assert elapsed < 20
    assert stored.key in str(info.value) and "Traceback" not in str(info.value)
    assert not (tmp_path / "out.txt").exists()

    # Data survives a restart on the same root and port (that port is still in TIME_WAIT).
    assert process.port_state("127.0.0.1", cfg.s3_port) in ("lingering", "free")
    t0 = time.monotonic()
    start(cfg)
    print(f"seaweedfs restart on the same port: {time.monotonic() - t0:.1f} s")
    assert store.get_file(stored.uri, tmp_path / "out.txt", stored.sha256).read_bytes() == b"kept"


@pytest.mark.slow
def test_all_three_services_start_healthy_and_stop(isolated_services, tmp_path, monkeypatch):
    cfg = isolated_services(ALL_SERVICES)
    state = start(cfg)
    print("start-up seconds (launched together):", dict(state.startup_s))
    database = ("postgres",) if cfg.database == "postgresql" else ()
    assert set(state.launched) == {*ALL_SERVICES, *database}
    assert all(st.alive and st.healthy for st in status(cfg)), status(cfg)
    with urllib.request.urlopen(f"{state.mlflow_uri}/health", timeout=5) as resp:
        assert resp.read().strip() == b"OK"
    with urllib.request.urlopen(f"{state.prefect_api_url}/health", timeout=5) as resp:
        assert json.loads(resp.read()) is True
    # The UI finds the API on this (random) port, not on Prefect's default 4200.
    with urllib.request.urlopen(f"{state.prefect_api_url.removesuffix('/api')}/ui-settings", timeout=5) as resp:
        assert json.loads(resp.read())["api_url"] == state.prefect_api_url

    # MLflow's proxied artifacts land in the bucket on SeaweedFS.
    import mlflow

    for name, value in env_for_clients(state).items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(state.mlflow_uri)
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "probe.txt")
    raw = boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                       aws_access_key_id=state.access_key, aws_secret_access_key=state.secret_key)
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=state.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/probe.txt") for k in keys), keys
    assert state.secret_key not in _all_text_under(cfg.root)

    assert stop(cfg) == ["prefect", "mlflow", *database, "seaweedfs"]
    assert not any(st.alive for st in status(cfg))
    assert not any(process.is_alive(pid) for pid in state.pids.values())
