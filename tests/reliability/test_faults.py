"""Injected faults against the real services. After each one: the previous champion still serves, every
object stored before the fault is still there with the same sha256, every registered version's bank and
model verify, and a re-run of the same retrain succeeds.

Default part (the session's shared services, faults that fail early): wrong credentials, a bucket that does
not exist, an unreachable object store, a feature cache that cannot be written (RLIMIT_FSIZE).

Slow part (`-m slow`, its own SeaweedFS + MLflow): the object store stopped before, during (multipart) and
after the bank upload, MLflow stopped mid-run, the retrain process killed with SIGKILL during feature
extraction and during registration, a feature cache on a full tmpfs (root only), two concurrent retrains
of one line. Flows pause at a named step through infra.faults (DEFECTOPS_FAULT_PAUSE) so the fault lands
exactly there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flows import promote, registry, tracking
from flows.feature_cache import write_cached_features
from flows.retrain import RetrainError, retrain
from infra import faults
from infra.locks import is_held
from infra.process import find_free_ports
from infra.services import env_for_clients, start, stop
from infra.storage import AccessDeniedError, BucketNotFoundError, EndpointUnreachableError, ObjectStore
from tests.e2e._pipeline import session, small_demo_line, write_params
from tests.reliability.invariants import check, orphans, snapshot
from tests.service_fixtures import make_config

PROJECT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ helpers
def assert_survived(record, case: str, state, line: dict, before: dict, champion: str) -> None:
    """Record the fault, then check the invariants: nothing lost or changed, registry consistent, the
    previous champion still @champion."""
    tracking.configure(state.mlflow_uri)
    report = check(state, line["name"], before)
    record("fault", case, lost=len(report.lost), corrupted=len(report.changed))
    assert report.ok, (report.lost, report.changed, report.problems)
    assert report.champion == champion


def rerun(line: dict, env: dict, record, case: str, state, overrides: list[str] | None = None) -> dict:
    """The same retrain again, without faults: it must succeed and decide (promote or reject)."""
    before = snapshot(state)
    with session(line["params"], env):
        result = retrain(line["line"], str(line["params"]), overrides)
    tracking.configure(state.mlflow_uri)
    report = check(state, line["name"], before, settled=(line["line"], line["root"]))
    record("re-run", f"re-run after: {case}", lost=len(report.lost), corrupted=len(report.changed))
    assert report.ok, (report.lost, report.changed, report.problems)
    info = registry.get_version(line["name"], result["version"])
    assert info["tags"]["promotion.decision"] in ("promoted", "rejected")
    return result


def _failed_run(line: dict) -> dict:
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.experiment_name(line["line"]))
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return tracking.get_run(runs[0].info.run_id)


# ------------------------------------------------------------------------------------------------ default part
def _fail_early(champion_line, record, case: str, env_change: dict, error: type, message: str, services) -> None:
    line = champion_line
    before = snapshot(services, deep=False)  # nothing is written before the failing step: a listing suffices
    tracking.configure(services.mlflow_uri)
    champion = registry.version_for_alias(line["name"], "champion")
    env = {**line["env"], **env_change}
    t0 = time.monotonic()
    with session(line["params"], env), pytest.raises(RetrainError) as info:
        retrain(line["line"], str(line["params"]), ["detector.patchcore.coreset_ratio=0.2"])
    elapsed = time.monotonic() - t0
    assert isinstance(info.value.__cause__, error) and message in str(info.value), repr(info.value)
    assert "failed at step 'check object store'" in str(info.value)
    assert not any(v in str(info.value) for v in (services.secret_key, "not-the-secret"))
    assert elapsed < 120, f"{case}: took {elapsed:.0f} s to fail"
    tracking.configure(services.mlflow_uri)
    run = _failed_run(line)
    assert run["status"] == "FAILED" and run["tags"]["failed_step"] == "check object store"
    assert_survived(record, case, services, line, before, champion)


def test_wrong_credentials(services, champion_line, record):
    _fail_early(champion_line, record, "wrong credentials", {"AWS_SECRET_ACCESS_KEY": "not-the-secret-key-000000"},
                AccessDeniedError, "access denied", services)


def test_bucket_does_not_exist(services, champion_line, record):
    _fail_early(champion_line, record, "bucket does not exist", {"DEFECTOPS_BUCKET": "no-such-bucket-here"},
                BucketNotFoundError, "bucket does not exist", services)


def test_object_store_unreachable(services, champion_line, record):
    port = find_free_ports("127.0.0.1", 1)[0]  # nothing listens there
    _fail_early(champion_line, record, "object store unreachable (nothing on the port)",
                {"DEFECTOPS_S3_ENDPOINT": f"http://127.0.0.1:{port}"}, EndpointUnreachableError,
                "endpoint unreachable", services)


def test_rerun_after_the_early_faults(services, champion_line, record):
    rerun(champion_line, champion_line["env"], record, "early faults (credentials, bucket, endpoint)", services)


def test_feature_cache_file_size_limit(tmp_path, record):
    """RLIMIT_FSIZE (what a quota or a full disk does to a write) in a child process: the cache write fails
    with EFBIG, write_cached_features returns None (the flow then fits from the images) and leaves no
    partial or temp file behind."""
    cache = tmp_path / "cache" / "features.safetensors"
    code = ("import resource, signal, sys, torch\n"
            "from pathlib import Path\n"
            "from flows.feature_cache import write_cached_features\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))\n"
            f"sha = write_cached_features(Path({str(cache)!r}), torch.zeros(100000))\n"
            "sys.exit(0 if sha is None else 3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    leftovers = sorted(p.name for p in cache.parent.iterdir()) if cache.parent.exists() else []
    record("fault", "feature cache write over the file size limit (EFBIG)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "File too large" in proc.stderr and "fitting from the images" in proc.stderr
    assert leftovers == []
    assert write_cached_features(cache, torch.zeros(10)) is not None  # without the limit it is cached


def test_fault_points_are_inert_unless_armed(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.PAUSE_ENV, raising=False)
    t0 = time.monotonic()
    faults.reached("extract")
    assert time.monotonic() - t0 < 0.1 and not faults.armed("extract")
    monkeypatch.setenv(faults.PAUSE_ENV, "register")
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path))
    assert not faults.armed("extract") and faults.armed("register")
    monkeypatch.setenv(faults.TIMEOUT_ENV, "0.2")
    faults.reached("register")
    assert list(tmp_path.glob("register.*.reached"))


# ------------------------------------------------------------------------------------------------ slow part
@pytest.fixture(scope="module")
def own(services, tmp_path_factory):
    """Own SeaweedFS + MLflow (the session's Prefect server), and line `reliable` with v1 @champion on them."""
    tmp = tmp_path_factory.mktemp("own")
    cfg = make_config(tmp / "services", ("seaweedfs", "mlflow"))
    state = start(cfg)
    env = {**env_for_clients(state), "PREFECT_API_URL": services.prefect_api_url}
    params = write_params(tmp / "params.yaml", tmp / "root",
                          {"reliable": {"data": small_demo_line(tmp / "line"), "max_train_images": 6}})
    line = {"params": params, "line": "reliable", "name": "defectops-reliable", "env": env, "root": tmp / "root"}
    try:
        with session(params, env):
            first = retrain("reliable", str(params))
        assert first["promoted"]
        yield {"cfg": cfg, "state": state, "line": line, "tmp": tmp}
    finally:
        stop(replace(cfg, services=("seaweedfs", "mlflow", "prefect")))


def _restart(own) -> None:
    """Start whatever of SeaweedFS / MLflow is down again (same root, ports and keys: data survives)."""
    state = start(own["cfg"])
    assert state.s3_endpoint == own["state"].s3_endpoint and state.mlflow_uri == own["state"].mlflow_uri
    own["state"] = state


def _kill(own, name: str) -> None:
    os.killpg(own["state"].pids[name], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(own["state"].pids[name], 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _cli_retrain(own, point: str, folder: Path, extra_env: dict | None = None, args: tuple = ()) -> subprocess.Popen:
    """`defectops retrain` in its own process group, paused at fault point `point`; output to folder/*.log."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **own["line"]["env"], **(extra_env or {}), faults.PAUSE_ENV: point,
           faults.DIR_ENV: str(folder), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    log = open(folder / f"retrain-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([str(Path(sys.executable).with_name("defectops")), "retrain", own["line"]["line"],
                             "--config", str(own["line"]["params"]), *args], cwd=own["tmp"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(folder.glob("*.log")))


def _wait_reached(procs: list[subprocess.Popen], folder: Path, point: str, count: int = 1,
                  timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{point}.*.reached"))) < count:
        assert all(p.poll() is None for p in procs), f"a retrain ended before {point}:\n{_logs(folder)}"
        assert time.monotonic() < deadline, f"no retrain reached {point} in {timeout:.0f} s"
        time.sleep(0.2)


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def _retrain_with_fault(own, record, case: str, point: str, action, expect_step: str,
                        extra_env: dict | None = None) -> None:
    """`defectops retrain` paused at `point`; run `action()`, release; the retrain must exit 1 naming
    `expect_step`; restart the services; check the invariants; re-run."""
    line, state = own["line"], own["state"]
    tracking.configure(state.mlflow_uri)
    before, champion = snapshot(state), registry.version_for_alias(line["name"], "champion")
    folder = own["tmp"] / "faults" / case.replace(" ", "-")
    proc = _cli_retrain(own, point, folder, extra_env, ("--set", "detector.patchcore.coreset_ratio=0.2"))
    try:
        _wait_reached([proc], folder, point)
        action()
        t0 = time.monotonic()
        (folder / f"{point}.release").touch()
        code = proc.wait(timeout=600)
        elapsed = time.monotonic() - t0
    finally:
        _kill_all([proc])
    text = " ".join(_logs(folder).split())
    # Prefect logs the failed task runs (with their tracebacks); the command ends with one clear line
    last = text[text.rfind("error: retrain"):]
    assert code == 1 and f"error: retrain reliable failed at step '{expect_step}'" in last, text[-3000:]
    assert elapsed < 300, f"{case}: failed only after {elapsed:.0f} s (retries must be bounded)"
    _restart(own)
    assert_survived(record, case, own["state"], line, before, champion)
    rerun(line, line["env"], record, case, own["state"])


@pytest.mark.slow
def test_store_stopped_before_upload(own, record):
    _retrain_with_fault(own, record, "object store stopped before the bank upload", "extract",
                        lambda: stop(replace(own["cfg"], services=("seaweedfs",))), "upload model")


@pytest.mark.slow
def test_store_killed_during_multipart_upload(own, record):
    _retrain_with_fault(own, record, "object store killed during the multipart bank upload",
                        "upload.multipart", lambda: _kill(own, "seaweedfs"), "upload model",
                        {"DEFECTOPS_S3_MULTIPART_THRESHOLD": "1"})


@pytest.mark.slow
def test_store_stopped_after_upload(own, record):
    _retrain_with_fault(own, record, "object store stopped after the bank upload", "upload.done",
                        lambda: stop(replace(own["cfg"], services=("seaweedfs",))), "evaluate")


@pytest.mark.slow
def test_mlflow_stopped_mid_run(own, record):
    _retrain_with_fault(own, record, "MLflow server stopped mid-run", "extract",
                        lambda: stop(replace(own["cfg"], services=("mlflow",))), "extract features")
    # the cause MLflow could not take when it died was kept and applied by the re-run (flows/debris.py)
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.experiment_name(own["line"]["line"]))
    late = client.search_runs([experiment.experiment_id], "tags.failure_recorded_late = 'true'")
    assert late and late[0].info.status == "FAILED" and late[0].data.tags["failed_step"] == "extract features"


@pytest.mark.slow
@pytest.mark.parametrize("point,step", [("extract", "feature extraction"), ("register", "registration")])
def test_sigkill_during(point, step, own, record):
    line, state = own["line"], own["state"]
    tracking.configure(state.mlflow_uri)
    before, champion = snapshot(state), registry.version_for_alias(line["name"], "champion")
    versions = [v["version"] for v in registry.list_versions(line["name"])]
    store = ObjectStore(state.s3_endpoint, state.bucket, state.access_key, state.secret_key)
    orphaned_before = set(orphans(store, line["line"]))
    folder = own["tmp"] / "faults" / f"sigkill-{point}"
    proc = _cli_retrain(own, point, folder, args=("--set", "detector.patchcore.coreset_ratio=0.2"))
    try:
        _wait_reached([proc], folder, point)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _kill_all([proc])
    assert proc.returncode == -signal.SIGKILL
    killed_run = _failed_run(line)
    assert killed_run["status"] == "RUNNING"  # nobody could end it
    assert [v["version"] for v in registry.list_versions(line["name"])] == versions  # nothing registered
    assert_survived(record, f"retrain process SIGKILLed during {step}", state, line, before, champion)
    rerun(line, line["env"], record, f"SIGKILL during {step}", state, ["detector.patchcore.coreset_ratio=0.2"])
    # an identical re-run writes the identical folder (no timings in the model), so whatever the killed run
    # uploaded is registered now: it leaves no orphan behind
    assert set(orphans(store, line["line"])) <= orphaned_before
    reaped = tracking.get_run(killed_run["run_id"])
    assert reaped["status"] == "KILLED" and reaped["tags"]["killed"]  # the re-run ended the orphan run


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_feature_cache_on_a_full_disk(own, record):
    """The feature cache on a 16 KiB tmpfs: the retrain still succeeds (fitting from the images) and no
    partial file stays in the cache."""
    line, state = own["line"], own["state"]
    cache = line["root"] / "cache" / "features"
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.iterdir():
        old.unlink()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(cache)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        tracking.configure(state.mlflow_uri)
        champion = registry.version_for_alias(line["name"], "champion")
        before = snapshot(state)
        with session(line["params"], line["env"]):
            result = retrain(line["line"], str(line["params"]), ["detector.patchcore.coreset_ratio=0.15"])
        leftovers = sorted(p.name for p in cache.iterdir())
    finally:
        subprocess.run(["umount", str(cache)])
    assert result["feature_cache_hit"] is False and leftovers == []
    assert_survived(record, "feature cache on a full disk (16 KiB tmpfs)", state, line, before,
                    result["champion"])
    assert champion is not None


@pytest.mark.slow
def test_two_concurrent_retrains_of_one_line(own, record):
    """Both retrains reach the gate together; the gate's lock makes them decide one after the other: the
    second decides against the first's outcome (compare-and-set), both decisions are recorded."""
    line, state = own["line"], own["state"]
    tracking.configure(state.mlflow_uri)
    before, champion = snapshot(state), registry.version_for_alias(line["name"], "champion")
    old_versions = {v["version"] for v in registry.list_versions(line["name"])}
    folder = own["tmp"] / "faults" / "concurrent"
    procs = [_cli_retrain(own, "promote", folder) for _ in range(2)]
    try:
        _wait_reached(procs, folder, "promote", count=2, timeout=900)
        (folder / "promote.release").touch()
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        _kill_all(procs)
    assert codes == [0, 0], _logs(folder)
    decisions = [v for v in registry.list_versions(line["name"]) if v["version"] not in old_versions]
    assert len(decisions) == 2 and all(v["tags"].get("promotion.decision") for v in decisions), decisions
    # Serialised: the first decided against the old champion, the second against the first's outcome.
    by_before = {v["version"]: v["tags"]["promotion.champion_before"] for v in decisions}
    first, second = decisions
    serial = [(a, b) for a, b in ((first, second), (second, first))
              if by_before[a["version"]] == champion
              and by_before[b["version"]] == (a["version"] if a["tags"]["promotion.decision"] == "promoted"
                                              else champion)]
    final = registry.version_for_alias(line["name"], "champion")
    report = check(state, line["name"], before)
    record("fault", "two concurrent retrains of one line", lost=len(report.lost), corrupted=len(report.changed))
    assert report.ok, (report.lost, report.changed, report.problems)
    assert serial, {v["version"]: (v["tags"]["promotion.decision"], by_before[v["version"]]) for v in decisions}
    a, b = serial[0]
    expected = b["version"] if b["tags"]["promotion.decision"] == "promoted" else (
        a["version"] if a["tags"]["promotion.decision"] == "promoted" else champion)
    assert final == expected
    for v in decisions:  # both decisions recorded on the version and in its run
        run = tracking.get_run(v["run_id"])
        assert run["tags"]["promotion.decision"] == v["tags"]["promotion.decision"]
        assert json.loads(v["tags"]["promotion.reasons"])
    assert not is_held(promote.gate_lock_path(line["name"]))  # lock released
