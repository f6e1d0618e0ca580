"""Retries and timeouts: bounded, on network I/O only, and measured against a dead endpoint."""

from __future__ import annotations

import os
import time

import pytest

from flows import retrain as retrain_mod
from flows import tracking, versioning
from flows.retrain import retry_on_network_error
from flows.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumError,
    EndpointUnreachableError,
    InvalidKeyError,
    ObjectStore,
    StorageError,
)
from infra.process import find_free_ports

ENV = {"DEFECTOPS_S3_ENDPOINT": "http://127.0.0.1:9", "DEFECTOPS_BUCKET": "b", "AWS_ACCESS_KEY_ID": "k",
       "AWS_SECRET_ACCESS_KEY": "s"}


def test_object_store_client_has_timeouts_and_bounded_retries(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    store = retrain_mod.object_store()
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


def test_retries_only_on_network_errors():
    assert retrain_mod.upload_model.retries == 2 and retrain_mod.upload_model.retry_delay_seconds == 2
    for task in (retrain_mod.extract_features, retrain_mod.build_model, retrain_mod.evaluate_model,
                 retrain_mod.register, retrain_mod.gate, retrain_mod.check_store):
        assert not task.retries, task.name

    class State:
        def __init__(self, exc):
            self.data = exc

    network = EndpointUnreachableError("e", "b", "k", "down")
    never = [AccessDeniedError("e", "b", "k", "x"), BucketNotFoundError("e", "b", "k", "x"),
             ChecksumError("e", "b", "k", "x"), InvalidKeyError("e", "b", "k", "x"), ValueError("user")]
    assert retry_on_network_error(None, None, State(network))
    assert retry_on_network_error(None, None, State(StorageError("e", "b", "k", "HTTP 503")))
    assert not any(retry_on_network_error(None, None, State(exc)) for exc in never)


def test_dvc_push_is_bounded():
    import inspect

    assert inspect.signature(versioning.push).parameters["attempts"].default == 2
    assert "timeout=900" in inspect.getsource(versioning.push)


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
            tracking._client().search_experiments()
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
