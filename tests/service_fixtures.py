"""Real local services for the end-to-end and reliability tests, started in a temporary root on free ports.

A pytest plugin (tests/conftest.py lists it in `pytest_plugins`), so tests/e2e and tests/reliability share
one session's services instead of each starting their own.

Fixtures (the session ones share one root, so SeaweedFS starts once even when both are used):

- ``object_store`` (session): SeaweedFS only, bucket created; a ``ServiceState`` (``s3_endpoint``,
  ``bucket``, ``access_key``, ``secret_key``; ``mlflow_uri``/``prefect_api_url`` are None).
- ``services`` (session): SeaweedFS + MLflow server + Prefect server; a ``ServiceState`` with every URL.
  Starting MLflow and Prefect takes 20-50 s on two busy cores: use it from ``slow`` tests.
- ``services_env`` (function): ``services`` plus ``env_for_clients`` set in ``os.environ`` for the test.
- ``store`` (function): an ``ObjectStore`` on ``object_store``'s bucket.
- ``isolated_services`` (function): a factory ``(services=("seaweedfs",), database=...) -> ServicesConfig`` with its
  own root and free ports, for tests that stop or break a server; whatever it started is stopped after.

Every root these fixtures start shares one set of service logins (``service-secrets.json`` seeded before the
first start), and ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` and ``PREFECT_API_AUTH_STRING`` are set for the
session, so in-process clients (``tracking.configure(state.mlflow_uri)``) authenticate against any of them.

Tests using these fixtures are marked ``services`` automatically. Set DEFECTOPS_TEST_START_TIMEOUT_S to
change the start-up timeout (default 180 s: the machine's cores are shared), and DEFECTOPS_TEST_DATABASE=
postgresql to run MLflow's backend store and Prefect's database on a local PostgreSQL cluster
(``services.database: postgresql``) instead of SQLite.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from infra.credentials import SERVICE_SECRET_NAMES, SERVICE_SECRETS_FILE, write_private_json
from infra.logins import MLFLOW_USER, PREFECT_USER
from infra.process import find_free_ports
from infra.services import ALL_SERVICES, ServicesConfig, ServiceState, env_for_clients, start, stop
from infra.storage import ObjectStore

_SERVICE_FIXTURES = {"object_store", "services", "services_env", "store", "isolated_services"}
START_TIMEOUT_S = float(os.environ.get("DEFECTOPS_TEST_START_TIMEOUT_S", "180"))
DATABASE = os.environ.get("DEFECTOPS_TEST_DATABASE", "sqlite")  # MLflow's and Prefect's: sqlite | postgresql


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


_LOGINS = {name: secrets.token_urlsafe(32) for name in SERVICE_SECRET_NAMES}


# In the environment from the start (before Prefect, imported at collection, reads its settings).
os.environ.update(MLFLOW_TRACKING_USERNAME=MLFLOW_USER, MLFLOW_TRACKING_PASSWORD=_LOGINS["mlflow_password"],
                  PREFECT_API_AUTH_STRING=f"{PREFECT_USER}:{_LOGINS['prefect_password']}")


def _seed_logins(root: Path) -> None:
    """The session's service logins in `root`, before its first start."""
    if not (root / SERVICE_SECRETS_FILE).exists():
        write_private_json(root / SERVICE_SECRETS_FILE, _LOGINS)


def _reachable_root(root: Path, database: str) -> Path:
    """PostgreSQL runs as the `postgres` user when the tests run as root, and pytest's temporary folders sit
    under a 0700 /tmp/pytest-of-root: such roots move to a folder of their own in /tmp (removed at exit)."""
    if database != "postgresql" or os.geteuid() != 0:
        return root
    moved = Path(tempfile.mkdtemp(prefix=f"defectops-test-{root.name}-"))
    atexit.register(shutil.rmtree, moved, True)
    return moved


def make_config(root: Path, services: tuple[str, ...] = ("seaweedfs",), database: str = DATABASE) -> ServicesConfig:
    """A config with its own root, fresh S3 credentials (not the caller's env), the session's service logins,
    three free ports and the session's database (DEFECTOPS_TEST_DATABASE: sqlite, or postgresql)."""
    root = _reachable_root(root, database)
    _seed_logins(root)
    s3_port, mlflow_port, prefect_port = find_free_ports("127.0.0.1", 3)
    return ServicesConfig(root=root, s3_port=s3_port, mlflow_port=mlflow_port, prefect_port=prefect_port,
                          access_key="", secret_key="", bucket="defectops-test",
                          start_timeout_s=START_TIMEOUT_S, services=services, database=database)


class _SharedServices:
    """One root for the session; each fixture asks for the services it needs, running ones are reused."""

    def __init__(self, root: Path) -> None:
        self.cfg = make_config(root, ALL_SERVICES)

    def ensure(self, services: tuple[str, ...]) -> ServiceState:
        return start(replace(self.cfg, services=services))

    def close(self) -> None:
        stop(self.cfg)


@pytest.fixture(scope="session")
def _shared_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SharedServices]:
    shared = _SharedServices(tmp_path_factory.mktemp("services"))
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture(scope="session")
def object_store(_shared_services: _SharedServices) -> ServiceState:
    return _shared_services.ensure(("seaweedfs",))


@pytest.fixture(scope="session")
def services(_shared_services: _SharedServices) -> ServiceState:
    return _shared_services.ensure(ALL_SERVICES)


@pytest.fixture
def services_env(services: ServiceState, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = env_for_clients(services)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="module")
def env(_shared_services: _SharedServices):
    """(state, ObjectStore) with SeaweedFS + MLflow up and this module's client environment set
    (tests/e2e/tiny_line.connect); used by the tracking, promotion and lineage tests."""
    from tests.e2e.tiny_line import connect

    state = _shared_services.ensure(("seaweedfs", "mlflow"))
    with pytest.MonkeyPatch.context() as mp:
        yield state, connect(state, mp)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A tiny fitted and evaluated PatchCore on a small brick line (tests/e2e/tiny_line.build_tiny)."""
    from tests.e2e.tiny_line import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def store(object_store: ServiceState) -> ObjectStore:
    return ObjectStore(object_store.s3_endpoint, object_store.bucket, object_store.access_key,
                       object_store.secret_key)


@pytest.fixture
def isolated_services(tmp_path: Path) -> Iterator[Callable[..., ServicesConfig]]:
    made: list[ServicesConfig] = []

    def factory(services: tuple[str, ...] = ("seaweedfs",), database: str = DATABASE) -> ServicesConfig:
        cfg = make_config(tmp_path / f"root{len(made)}", services, database)
        made.append(cfg)
        return cfg

    try:
        yield factory
    finally:
        for cfg in made:
            stop(replace(cfg, services=ALL_SERVICES))
