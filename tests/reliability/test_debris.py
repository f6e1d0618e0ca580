"""Crash debris (issue 16): the next run removes work folders of runs that no longer run and temp folders of
dead clients, applies a failure MLflow could not take when it died, and sets a killed flow run CRASHED."""

from __future__ import annotations

import os

from flows import debris, tracking


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid -= 1


def test_work_folders_and_recorded_failures(env, tmp_path, record):
    root = tmp_path / "root"
    running = tracking.start_run("debris", "running", {"kind": "test"})
    ended = tracking.start_run("debris", "ended", {"kind": "test"})
    tracking.end_run(ended)
    folders = {name: root / "work" / name for name in (running, ended, "not-a-run")}
    folders |= {"dead client": root / "tmp" / f"client-{_dead_pid()}-x", "me": root / "tmp" / f"client-{os.getpid()}-y"}
    for folder in folders.values():
        (folder / "sub").mkdir(parents=True)
    removed = debris.clean_work(root, keep=None)
    debris.record_failure(root, running, {"failed_step": "promote", "error": "MLflow was down"})
    replayed = debris.replay_failures(root)
    run = tracking.get_run(running)
    record("fault", "crash debris: work folders of ended runs and dead clients removed, a lost failure applied")
    assert sorted(removed) == sorted([folders[ended], folders["not-a-run"], folders["dead client"]])
    assert folders[running].is_dir() and folders["me"].is_dir()
    assert replayed == [running] and run["status"] == "FAILED"
    assert run["tags"]["failed_step"] == "promote" and not list((root / "failures").iterdir())


def test_killed_flow_run_is_set_crashed(services, record):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    @flow(name="debris-probe")
    def probe() -> None:
        pass

    with temporary_settings(updates={PREFECT_API_URL: services.prefect_api_url}), \
            get_client(sync_client=True) as client:
        run = client.create_flow_run(probe, name="killed")
        client.set_flow_run_state(run.id, Running(), force=True)
        crashed = debris.crash_flow_runs([str(run.id)], "its process was gone")
        state = client.read_flow_run(run.id).state
    record("fault", "a killed run's Prefect flow run set CRASHED by the next run")
    assert crashed == [str(run.id)] and state.type.value == "CRASHED"
