"""What the managed background processes of defectops (the inference service, infra/api_service.py; the
schedule runner, infra/scheduler.py) share: how a `defectops` subcommand is launched, waiting for its
health URL, stopping it by its record in ``ROOT/pids.json``, and its status from that record."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from infra import pidfile, process
from infra.services import ServiceStartError, ServiceStatus

logger = logging.getLogger(__name__)


def defectops_argv() -> list[str]:
    """The command that runs `defectops`: this environment's script, else the one on PATH, else the module."""
    local = Path(sys.executable).parent / "defectops"
    if local.exists():
        return [str(local)]
    found = shutil.which("defectops")
    return [found] if found else [sys.executable, "-c", "from flows.cli import main; raise SystemExit(main())"]


def wait_healthy(name: str, rec: dict, proc: subprocess.Popen | None, timeout_s: float, poll_s: float,
                 stop: Callable[[], object]) -> ServiceStatus:
    """Wait until rec["health_url"] answers; on exit of `proc` (None: a process found running) or after
    timeout_s, `stop()` and raise ServiceStartError with the log tail."""
    deadline = time.monotonic() + timeout_s
    while not process.http_ok(rec["health_url"]):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            stop()
            reason = "exited" if proc is not None and proc.poll() is not None else "was not healthy in time"
            raise ServiceStartError(f"{name} {reason} (log: {rec['log']}). Last log lines:\n"
                                    f"{process.log_tail(Path(rec['log']))}")
        time.sleep(poll_s)
    return ServiceStatus(name, rec["pid"], True, True, rec["url"])


def stop_recorded(root: Path, name: str, term_timeout_s: float) -> bool:
    """SIGTERM the process group recorded as `name`, SIGKILL after `term_timeout_s`; drop its record. Also
    when the leader is gone but its pid is not reused (its children may remain). True when it was running.
    The caller may hold the root lock."""
    root = Path(root).resolve()
    records = pidfile.read_records(root)
    rec = records.pop(name, None)
    if rec is None:
        return False
    was_running = pidfile.running(rec)
    if was_running or process.start_time(rec["pid"]) is None:
        t0 = time.monotonic()
        outcome = process.stop_group(rec["pid"], term_timeout_s=term_timeout_s)
        logger.info("%s: %s after %.1f s", name, outcome, time.monotonic() - t0)
        if outcome == "killed":
            logger.warning("%s: pid %d ignored SIGTERM for %.0f s and was killed", name, rec["pid"], term_timeout_s)
    pidfile.write_records(root, records)
    return was_running


def recorded_status(root: Path, name: str) -> ServiceStatus | None:
    """The status of the process recorded as `name` in this root (None without a record)."""
    rec = pidfile.read_records(Path(root).resolve()).get(name)
    if rec is None:
        return None
    alive = pidfile.running(rec)
    return ServiceStatus(name, rec["pid"], alive, alive and process.http_ok(rec["health_url"]), rec["url"])
