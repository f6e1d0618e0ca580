"""The schedule runner as a managed service: the `defectops serve` process (one cron deployment per line on the
Prefect server, flows/schedules.py) started in the background, recorded in ``ROOT/pids.json`` as
``schedules`` next to the services of ``infra.services``, listed by ``status`` and stopped by ``stop``
BEFORE the Prefect server it talks to (otherwise it retries against a stopped server for about a minute,
printing tracebacks).

    state = start(cfg)                                     # the services
    start_schedules(cfg, Path("params.yaml"))              # `defectops serve --detach`, or `up` with
    schedules_status(cfg.root)                             #   services.schedules: true
    stop(cfg)                                              # stops the runner first, then the services

Health is Prefect's runner webserver (``PREFECT_RUNNER_SERVER_ENABLE``) on a free 127.0.0.1 port, probed at
``/run_count``: it answers while the runner process runs (the webserver thread dies with the runner's loop).
Its ``/health`` is not used: in Prefect 3.8 it raises (HTTP 500, a traceback in the log) until the runner's
first poll. The runner handles SIGTERM by pausing its deployments and exiting; ``stop_schedules`` waits at
most ``term_timeout_s`` before SIGKILL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from infra import pidfile, process
from infra.background import defectops_argv, recorded_status, stop_recorded, wait_healthy
from infra.services import ServicesConfig, ServiceStartError, ServiceStatus

logger = logging.getLogger(__name__)

SCHEDULES = "schedules"
STOP_TIMEOUT_S = 20.0


def start_schedules(cfg: ServicesConfig, params: Path, lines: Sequence[str] = (), *,
                    timeout_s: float | None = None) -> ServiceStatus:
    """Start `defectops serve --config PARAMS [--line ...]` in the background (reused when one already runs
    from this root with the same params and lines) and wait until its runner is healthy. The Prefect
    server must be up (or PREFECT_API_URL set). ServiceStartError with the log tail when it does not start."""
    root, params = cfg.root.resolve(), Path(params).resolve()
    wanted = {"params": str(params), "lines": sorted(lines)}
    with pidfile.locked(root):
        records = pidfile.read_records(root)
        rec = records.get(SCHEDULES)
        if pidfile.running(rec):
            if {"params": rec.get("params"), "lines": rec.get("lines", [])} != wanted:
                raise ServiceStartError(f"{SCHEDULES}: already running from {root} with {rec.get('params')} "
                                        f"lines {rec.get('lines') or 'all'}; stop it first (`defectops down`)")
            proc = None
        else:
            port = process.find_free_ports(cfg.host, 1)[0]
            log, tmp = root / "logs" / f"{SCHEDULES}.log", root / "tmp" / SCHEDULES
            tmp.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", "PREFECT_RUNNER_SERVER_ENABLE": "true",
                   "PREFECT_RUNNER_SERVER_HOST": cfg.host, "PREFECT_RUNNER_SERVER_PORT": str(port)}
            argv = [*defectops_argv(), "serve", "--config", str(params)]
            argv += [arg for line in wanted["lines"] for arg in ("--line", line)]
            proc = process.launch(argv, env=env, cwd=Path.cwd(), log_file=log)
            url = f"http://{cfg.host}:{port}"
            rec = {**pidfile.make_record(proc.pid, port, url, f"{url}/run_count", log, {}), **wanted}
            records[SCHEDULES] = rec
            pidfile.write_records(root, records)
            logger.info("%s: started pid %d, log %s", SCHEDULES, proc.pid, log)
    # Not under the lock: the runner itself reads the services' records (flows.ops_cli.client_env).
    return wait_healthy(SCHEDULES, rec, proc, cfg.start_timeout_s if timeout_s is None else timeout_s, 0.5,
                        lambda: stop_schedules(root))


def stop_schedules(root: Path, term_timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the runner's process group (it pauses its schedules and exits), SIGKILL after
    `term_timeout_s`; drop its record. True when something was running. Caller may hold the root lock."""
    return stop_recorded(root, SCHEDULES, term_timeout_s)


def schedules_status(root: Path) -> ServiceStatus | None:
    """The runner's status when this root has a record of one (else None)."""
    return recorded_status(root, SCHEDULES)
