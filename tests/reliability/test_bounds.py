"""Retries and timeouts: bounded, on network I/O only, and measured against a dead endpoint."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows import steps, tracking, versioning
from flows.steps import retry_on_network_error
from infra.process import find_free_ports
from infra.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumError,
    EndpointUnreachableError,
    InvalidKeyError,
    ObjectStore,
    StorageError,
)

ENV = {"DEFECTOPS_S3_ENDPOINT": "http://127.0.0.1:9", "DEFECTOPS_BUCKET": "b", "AWS_ACCESS_KEY_ID": "k",
       "AWS_SECRET_ACCESS_KEY": "s"}


def test_object_store_client_has_timeouts_and_bounded_retries(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    store = steps.object_store()
    config = store._client.meta.config
    assert config.connect_timeout == 3 and config.read_timeout == 60
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    default = ObjectStore.from_env(ENV)._client.meta.config
    assert default.connect_timeout == 5 and default.read_timeout == 60 and default.retries["total_max_attempts"] == 4


def test_multipart_threshold_from_the_environment():
    assert ObjectStore.from_env({**ENV, "DEFECTOPS_S3_MULTIPART_THRESHOLD": "1"})._transfer.multipart_threshold == 1
    with pytest.raises(ValueError, match="DEFECTOPS_S3_MULTIPART_THRESHOLD"):
        ObjectStore.from_env({**ENV, "DEFECTOPS_S3_MULTIPART_THRESHOLD": "lots"})


def test_unreachable_store_fails_fast(record):
    port = find_free_ports("127.0.0.1", 1)[0]
    store = ObjectStore.from_env({**ENV, "DEFECTOPS_S3_ENDPOINT": f"http://127.0.0.1:{port}"},
                                 connect_timeout=3, max_attempts=2)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError):
        store.exists("s3://b/models/x")
    record("fault", "object store call against a closed port: bounded failure")
    assert time.monotonic() - t0 < 15


class _FakeS3(ThreadingHTTPServer):
    """A real HTTP endpoint that answers every request with one status (and an S3 error body) and counts
    them; with status None it accepts connections and never answers (a hung store)."""

    def __init__(self, status: int | None, code: str = "") -> None:
        self.status, self.code, self.requests = status, code, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests += 1
                if outer.status is None:
                    time.sleep(3600)
                body = f"<Error><Code>{outer.code}</Code><Message>x</Message></Error>".encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _upload_attempts(status: int, code: str, model_dir: Path, monkeypatch) -> int:
    """Run the retrain's upload_model task in a flow against a store answering `status`; -> requests seen."""
    from prefect import flow

    server = _FakeS3(status, code)
    for name, value in {**ENV, "DEFECTOPS_S3_ENDPOINT": server.url}.items():
        monkeypatch.setenv(name, value)

    @flow(name="upload-retry-probe")
    def probe() -> None:
        steps.upload_model(run_id="none", model_dir=str(model_dir), line="probe")

    with pytest.raises(StorageError):
        probe()
    server.shutdown()
    return server.requests


@pytest.mark.slow
def test_retries_only_on_network_errors(tmp_path, monkeypatch, record):
    """Behaviour, through Prefect: a store answering 503 gets the task's 2 retries (3 attempts, each with
    its 2 client attempts), one refusing the keys (403) is tried once."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "bank.safetensors").write_bytes(b"x" * 100)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    denied = _upload_attempts(403, "AccessDenied", tmp_path / "m", monkeypatch)
    unavailable = _upload_attempts(503, "ServiceUnavailable", tmp_path / "m", monkeypatch)
    record("fault", "upload task: retried on 503 (3 attempts), never on 403 (1 attempt)")
    assert denied == 1, denied
    assert unavailable == 3 * 2, unavailable
    for task in (steps.extract_features, steps.build_model, steps.evaluate_model,
                 steps.register, steps.gate, steps.check_store):
        assert not task.retries, task.name
    never = [AccessDeniedError("e", "b", "k", "x"), BucketNotFoundError("e", "b", "k", "x"),
             ChecksumError("e", "b", "k", "x"), InvalidKeyError("e", "b", "k", "x"), ValueError("user")]
    assert not any(retry_on_network_error(None, None, type("S", (), {"data": exc})()) for exc in never)


def test_hung_store_is_bounded_by_user_timeouts(record):
    """A store that accepts the connection and never answers fails after the user's read timeout."""
    server = _FakeS3(None)
    env = {**ENV, "DEFECTOPS_S3_ENDPOINT": server.url, "DEFECTOPS_S3_READ_TIMEOUT_S": "2"}
    store = ObjectStore.from_env(env, max_attempts=1)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError):
        store.exists("s3://b/models/x")
    elapsed = time.monotonic() - t0
    record("fault", "hung object store (accepts, never answers): fails after the user's 2 s read timeout")
    assert elapsed < 10, elapsed
    with pytest.raises(ValueError, match="DEFECTOPS_S3_READ_TIMEOUT_S"):
        ObjectStore.from_env({**ENV, "DEFECTOPS_S3_READ_TIMEOUT_S": "forever"})


def test_dvc_push_is_bounded(tmp_path, record):
    """`dvc push` to a hung store: each attempt killed after its timeout, 2 attempts, one clear error."""
    server = _FakeS3(None)
    registry = versioning.ensure_registry(tmp_path / "registry", "bucket")
    versioning.write_remote_credentials(registry, server.url, "k" * 16, "s" * 32)
    (registry / "data.txt").write_text("data")
    versioning._dvc(registry, "add", "-q", "data.txt")
    t0 = time.monotonic()
    with pytest.raises(versioning.VersioningError, match="no answer after 4 s"):
        versioning.push(registry, "data.txt.dvc", attempts=2, delay_s=0.1, timeout_s=4)
    elapsed = time.monotonic() - t0
    record("fault", "dvc push to a hung store: 2 attempts of 4 s, then one clear error")
    assert 8 <= elapsed < 30, elapsed
    assert versioning.push_timeout_s({}) == 300 and versioning.push_timeout_s({versioning.PUSH_TIMEOUT_ENV: "20"}) == 20
    with pytest.raises(ValueError, match=versioning.PUSH_TIMEOUT_ENV):
        versioning.push_timeout_s({versioning.PUSH_TIMEOUT_ENV: "0"})


def test_mlflow_http_calls_are_bounded(monkeypatch, record):
    for name in tracking.HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    previous = tracking._state["uri"]
    port = find_free_ports("127.0.0.1", 1)[0]
    try:
        tracking.configure(f"http://127.0.0.1:{port}")
        assert {k: os.environ[k] for k in tracking.HTTP_BOUNDS} == tracking.HTTP_BOUNDS
        t0 = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - MlflowException or requests' ConnectionError
            tracking.client().search_experiments()
        elapsed = time.monotonic() - t0
    finally:
        if previous:
            tracking.configure(previous)
    record("fault", f"MLflow call against a closed port: failed after {elapsed:.0f} s (bounded)")
    assert elapsed < 30  # MLflow's defaults (7 retries, backoff factor 2) take about 4 minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    try:
        tracking.configure(f"http://127.0.0.1:{port}")  # does not connect
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"  # the operator's setting wins
    finally:
        if previous:
            tracking.configure(previous)
