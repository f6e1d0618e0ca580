"""Load (issue 16): several lines retrained at once (`retrain-all` over Dask) while batch inference and the
drift monitor run against the same services, on the embedded SQLite databases (MLflow's backend store and
Prefect's), or with DEFECTOPS_TEST_DATABASE=postgresql on a local PostgreSQL cluster (`services.database`).
Counted: flow runs attempted and failed, decision records lost (images scored by a batch inference but not in
the decision record), and the database errors the services logged during the run (`database is locked` on
SQLite; deadlocks, serialization failures or refused connections on PostgreSQL). Marked `slow` and `load`:
`pytest -m load tests/reliability/test_load.py`.

Prefect on SQLite is known to fail with `database is locked` under concurrent writers (Prefect issues
#10188, #17473, #19771); this is the test that would show it here. docs/reliability.md ("Load") has both.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows import registry, tracking
from flows.names import model_name
from flows.service.decisions import DecisionStore
from infra.services import ALL_SERVICES, env_for_clients, start, stop
from tests.e2e._pipeline import small_demo_line, write_params
from tests.service_fixtures import make_config

pytestmark = [pytest.mark.slow, pytest.mark.load, pytest.mark.services]
PROJECT = Path(__file__).resolve().parents[2]
N_LINES = 4
INFERENCE_ROUNDS = 3
LOCKED = re.compile(r"database is locked|deadlock detected|could not serialize|too many (clients|connections)|"
                    r"remaining connection slots", re.I)


def _cli(args: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as fh:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, env=env, stdout=fh,
                              stderr=subprocess.STDOUT, timeout=1800)


def _log_lines(root: Path, since: dict[str, int]) -> dict[str, list[str]]:
    """New lines of each service log since the byte offsets in `since`."""
    out = {}
    for log in sorted((root / "logs").glob("*.log")):
        with open(log, errors="replace") as fh:
            fh.seek(since.get(log.name, 0))
            out[log.name] = fh.read().splitlines()
    return out


def test_retrain_all_with_inference_and_monitor_running(tmp_path, record):
    cfg = make_config(tmp_path / "root", ALL_SERVICES)  # DEFECTOPS_TEST_DATABASE picks the database
    root = cfg.root  # moved out of pytest's 0700 folder when PostgreSQL runs as its own user
    state = start(cfg)
    try:
        data = small_demo_line(tmp_path / "line")
        lines = {f"load-{i}": {"data": data, "max_train_images": 3 + i} for i in range(N_LINES)}
        params = write_params(tmp_path / "params.yaml", root, lines)
        env = {**os.environ, **env_for_clients(state), "DEFECTOPS_CODE_DIR": str(PROJECT)}
        logs = tmp_path / "logs"
        logs.mkdir()
        first = _cli(["retrain", "load-0", "--config", str(params)], env, logs / "first.log")
        assert first.returncode == 0, (logs / "first.log").read_text()[-3000:]
        offsets = {p.name: p.stat().st_size for p in (root / "logs").glob("*.log")}
        images = sorted(str(p) for p in (data / "test").rglob("*.png"))
        results: dict[str, list[int]] = {"inference": [], "monitor": []}

        done = threading.Event()

        def batch_inference() -> None:  # until the fan-out ends (at least INFERENCE_ROUNDS times)
            while not done.is_set() or len(results["inference"]) < INFERENCE_ROUNDS:
                i = len(results["inference"])
                results["inference"].append(_cli(["inference", "load-0", *images, "--config", str(params)], env,
                                                 logs / f"inference-{i}.log").returncode)

        def monitoring() -> None:
            while not done.is_set() or len(results["monitor"]) < INFERENCE_ROUNDS:
                i = len(results["monitor"])
                results["monitor"].append(_cli(["monitor", "load-0", "--config", str(params)], env,
                                               logs / f"monitor-{i}.log").returncode)
                time.sleep(2)

        side = [threading.Thread(target=batch_inference), threading.Thread(target=monitoring)]
        t0 = time.monotonic()
        for thread in side:
            thread.start()
        try:
            fan_out = _cli(["retrain-all", "--config", str(params), "--workers", "2"], env, logs / "retrain-all.log")
        finally:
            done.set()
            for thread in side:
                thread.join(timeout=1800)
        elapsed = time.monotonic() - t0
        new_lines = _log_lines(root, offsets)
        locked = {name: [line for line in text if LOCKED.search(line)] for name, text in new_lines.items()}
        tracking.configure(state.mlflow_uri, root=root)
        versions = {line: registry.list_versions(model_name(line)) for line in lines}
        store = DecisionStore(root / "serving")
        try:
            recorded = len([r for r in store.recent("load-0", limit=100000) if r["alias"] == "batch"])
        finally:
            store.close()
        scored = sum(code == 0 for code in results["inference"]) * len(images)
        attempted = 1 + N_LINES + len(results["inference"]) + len(results["monitor"])
        failed = sum(code != 0 for code in [fan_out.returncode, *results["inference"], *results["monitor"]])
        database = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}[cfg.database]
        summary = (f"{database}: {attempted} flow runs ({N_LINES} lines retrained at once, {len(results['inference'])} "
                   f"batch inferences and {len(results['monitor'])} monitor checks beside them) in {elapsed:.0f} s: "
                   f"{failed} failed, "
                   f"{scored - recorded} decision records lost, "
                   f"{sum(len(v) for v in locked.values())} database lock or connection errors in the logs")
        print(summary)
        record("load", summary, lost=max(0, scored - recorded))
        assert fan_out.returncode == 0, (logs / "retrain-all.log").read_text()[-3000:]
        assert set(results["inference"]) == {0}, [p.read_text()[-2000:] for p in logs.glob("inference-*")]
        assert set(results["monitor"]) == {0}, [p.read_text()[-2000:] for p in logs.glob("monitor-*")]
        assert all(v and v[-1]["tags"].get("promotion.decision") in ("promoted", "rejected")
                   for v in versions.values()), versions
        assert recorded == scored, (recorded, scored)
        assert not any(locked.values()), locked
    finally:
        stop(cfg)
