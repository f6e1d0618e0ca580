"""Reliability suite: bad input, fuzzed input and config, injected faults against the real services, security.

Each test records what it tried through the `record` fixture (kind, case, objects lost and corrupted,
counted before its assertions); the outcome comes from pytest. With DEFECTOPS_RELIABILITY_JSON=PATH set, the
session writes every record there, and `python -m tests.reliability.table PATH` prints the table in docs/reliability.md.

The services fixtures (services, isolated_services, ...) come from tests/service_fixtures.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

_RECORDS: dict[str, list[dict]] = {}
_OUTCOMES: dict[str, str] = {}
SUMMARY_ENV = "DEFECTOPS_RELIABILITY_JSON"


@pytest.fixture
def record(request):
    """record(kind, case, lost=0, corrupted=0): kind is "bad input", "fuzz", "fault", "re-run" or "security"."""

    def add(kind: str, case: str, lost: int = 0, corrupted: int = 0) -> None:
        _RECORDS.setdefault(request.node.nodeid, []).append(
            {"kind": kind, "case": case, "lost": int(lost), "corrupted": int(corrupted)})

    return add


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES[item.nodeid] = report.outcome
        if item.module.__name__.endswith("test_hypothesis") and item.nodeid not in _RECORDS:
            from hypothesis import settings

            _RECORDS[item.nodeid] = [{"kind": "fuzz", "case": f"{item.name} ({settings().max_examples} examples)",
                                      "lost": 0, "corrupted": 0}]
    return report


def pytest_sessionfinish(session) -> None:
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    rows = [{**entry, "test": nodeid, "outcome": _OUTCOMES.get(nodeid, "unknown")}
            for nodeid, entries in _RECORDS.items() for entry in entries]
    failed_unrecorded = [n for n, o in _OUTCOMES.items() if o == "failed" and n not in _RECORDS]
    payload = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "records": rows,
               "failed_without_record": failed_unrecorded}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))


LINE = "reliable"


@pytest.fixture(scope="session")
def champion_line(services, tmp_path_factory) -> dict:
    """Line `reliable` on the session's services with version 1 as @champion (one in-process retrain):
    {params, first (retrain result), line_dir, root (services.root of the clients), name, env}."""
    from flows.retrain import model_name, retrain
    from infra.services import env_for_clients
    from tests.e2e._pipeline import session, small_demo_line, write_params

    tmp = tmp_path_factory.mktemp("reliable")
    params = write_params(tmp / "params.yaml", tmp / "root",
                          {LINE: {"data": small_demo_line(tmp / "line"), "max_train_images": 6}})
    env = env_for_clients(services)
    with session(params, env):
        first = retrain(LINE, str(params))
    assert first["promoted"] and first["champion"] == "1"
    return {"params": params, "first": first, "line_dir": tmp / "line", "root": tmp / "root",
            "name": model_name(LINE), "env": env, "line": LINE}
