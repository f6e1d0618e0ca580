"""What a killed run leaves behind, cleaned up by the next run of the line (issue 16, crash debris):

- its MLflow run left RUNNING (tracking.reap_dead_runs ends it KILLED) and its Prefect flow run left
  RUNNING: `crash_flow_runs` sets the latter CRASHED, naming the reaped MLflow run;
- its failure cause, when MLflow was the service that died and `fail_run` could not tag the run: kept in
  `<services.root>/failures/<run_id>.json` and applied to the run by `replay_failures`;
- `<services.root>/work/<run_id>` folders of runs that no longer run, and `<services.root>/tmp/client-<pid>-*`
  folders of client processes that are gone: `clean_work`.

    debris.replay_failures(root); debris.crash_flow_runs(reaped_flow_run_ids); debris.clean_work(root)

Every step is best effort and logs what it did; none of them stops a run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from flows import tracking

logger = logging.getLogger(__name__)

FAILURES, WORK = "failures", "work"


def record_failure(root: Path, run_id: str, tags: dict[str, str]) -> Path:
    """Keep a failure the run could not be tagged with (MLflow down) for `replay_failures`."""
    path = Path(root) / FAILURES / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "tags": tags}))
    return path


def replay_failures(root: Path) -> list[str]:
    """Tag each recorded failure's run and end it FAILED (it was KILLED or left RUNNING); -> run ids done."""
    done = []
    for path in sorted((Path(root) / FAILURES).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            tracking.set_run_tags(record["run_id"], {**record["tags"], "failure_recorded_late": "true"})
            tracking.end_run(record["run_id"], "FAILED")
        except Exception as exc:  # noqa: BLE001 - best effort, retried on the next run
            logger.warning("could not apply the recorded failure %s: %s", path, exc)
            continue
        path.unlink(missing_ok=True)
        done.append(record["run_id"])
    return done


def crash_flow_runs(flow_run_ids: list[str], reason: str) -> list[str]:
    """Set the Prefect flow runs (left RUNNING by a killed process) CRASHED; -> ids set."""
    if not flow_run_ids:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    crashed = []
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
                    crashed.append(flow_run_id)
            except Exception as exc:  # noqa: BLE001 - an unknown id (other server) is not an error here
                logger.warning("could not set Prefect flow run %s CRASHED: %s", flow_run_id, exc)
    return crashed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_work(root: Path, keep: str | None = None) -> list[Path]:
    """Remove `work/<run_id>` of runs that are not RUNNING any more (ended, reaped, or unknown to MLflow)
    and `tmp/client-<pid>-*` of processes that are gone; `keep`: this run's id. -> folders removed."""
    removed = []
    for folder in sorted((Path(root) / WORK).glob("*")):
        if not folder.is_dir() or folder.name == keep:
            continue
        try:
            status = tracking.get_run(folder.name)["status"]
        except tracking.RegistryError:
            status = "UNKNOWN"
        except Exception:  # noqa: BLE001 - MLflow unreachable: leave it for a later run
            continue
        if status != "RUNNING":
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for folder in sorted((Path(root) / "tmp").glob("client-*-*")):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        logger.info("removed %d work folder(s) left by earlier runs: %s", len(removed), [p.name for p in removed])
    return removed


def after_crashes(line: str, root: Path) -> list[str]:
    """At the start of a run of `line`: end KILLED the MLflow runs whose process is gone, set their Prefect
    flow runs CRASHED, apply failures recorded while MLflow was down. -> the reaped MLflow run ids."""
    reaped = tracking.reap_dead_runs(line)
    flow_runs = []
    for run_id in reaped:
        flow_run_id = tracking.get_run(run_id)["tags"].get("flow_run_id", "")
        if flow_run_id and flow_run_id != "none":
            flow_runs.append(flow_run_id)
    crash_flow_runs(flow_runs, f"its process was gone when a later run of {line} started")
    replay_failures(root)
    return reaped
