"""The inference service as a managed service: `defectops api` (flows/service/) started in the background,
recorded in ``ROOT/pids.json`` as ``api`` next to the services of ``infra.services``, listed by ``status``
and stopped by ``stop`` before the MLflow server and object store it reads from.

    state = start(cfg)                                          # the services
    start_api(cfg, Path("params.yaml"), env_for_clients(state)) # `defectops up` with service.autostart
    api_status(cfg.root); stop(cfg)                             # stop() stops the api first

Health is the service's own ``/healthz`` (the process answers); ``/readyz`` says whether every line's
champion is loaded, which needs a registered champion and is not waited for here.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from infra import pidfile, process
from infra.services import OFFLINE_ENV, PortInUseError, ServicesConfig, ServiceStartError, ServiceStatus

logger = logging.getLogger(__name__)

API = "api"
STOP_TIMEOUT_S = 15.0


def _defectops_argv() -> list[str]:
    local = Path(sys.executable).parent / "defectops"
    if local.exists():
        return [str(local)]
    found = shutil.which("defectops")
    return [found] if found else [sys.executable, "-c", "from flows.cli import main; raise SystemExit(main())"]


def probe_url(host: str, port: int) -> str:
    """Where the service is reached from this machine (a wildcard bind is probed on loopback)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def start_api(cfg: ServicesConfig, params: Path | None, client_env: Mapping[str, str], *, host: str = "127.0.0.1",
              port: int = 8000, timeout_s: float | None = None) -> ServiceStatus:
    """Start `defectops api --config PARAMS --root ROOT --host HOST --port PORT` in the background with the
    services' client environment (reused when one already runs from this root on that port), and wait for
    /healthz. ServiceStartError with the log tail when it does not start; PortInUseError when the port is
    taken by something else."""
    root = cfg.root.resolve()
    with pidfile.locked(root):
        records = pidfile.read_records(root)
        rec = records.get(API)
        proc = None
        if pidfile.running(rec):
            if rec["port"] != port:
                raise ServiceStartError(f"{API} already runs from {root} on port {rec['port']}, not {port}; "
                                        "stop it first (`defectops down`)")
        else:
            if process.port_state(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port) == "in_use":
                raise PortInUseError(f"{API}: port {port} is already in use by another process; set service.port")
            log, tmp = root / "logs" / f"{API}.log", root / "tmp" / API
            tmp.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **OFFLINE_ENV, **client_env, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
            argv = [*_defectops_argv(), "api", "--root", str(root), "--host", host, "--port", str(port)]
            if params is not None:
                argv += ["--config", str(Path(params).resolve())]
            proc = process.launch(argv, env=env, cwd=Path.cwd(), log_file=log)
            url = probe_url(host, port)
            rec = pidfile.make_record(proc.pid, port, url, f"{url}/healthz", log, {})
            records[API] = rec
            pidfile.write_records(root, records)
            logger.info("%s: started pid %d, log %s", API, proc.pid, log)
    deadline = time.monotonic() + (cfg.start_timeout_s if timeout_s is None else timeout_s)
    while not process.http_ok(rec["health_url"]):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            stop_api(root)
            reason = "exited" if proc is not None and proc.poll() is not None else "was not healthy in time"
            raise ServiceStartError(f"{API} {reason} (log: {rec['log']}). Last log lines:\n"
                                    f"{process.log_tail(Path(rec['log']))}")
        time.sleep(0.3)
    return ServiceStatus(API, rec["pid"], True, True, rec["url"])


def stop_api(root: Path, term_timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the service (uvicorn finishes the requests in flight), SIGKILL after `term_timeout_s`; drop
    its record. True when it was running. The caller may hold the root lock."""
    root = Path(root).resolve()
    records = pidfile.read_records(root)
    rec = records.pop(API, None)
    if rec is None:
        return False
    was_running = pidfile.running(rec)
    if was_running or process.start_time(rec["pid"]) is None:
        outcome = process.stop_group(rec["pid"], term_timeout_s=term_timeout_s)
        if outcome == "killed":
            logger.warning("%s: pid %d ignored SIGTERM and was killed", API, rec["pid"])
    pidfile.write_records(root, records)
    return was_running


def api_status(root: Path) -> ServiceStatus | None:
    """The service's status when this root has a record of one (else None)."""
    rec = pidfile.read_records(Path(root).resolve()).get(API)
    if rec is None:
        return None
    alive = pidfile.running(rec)
    return ServiceStatus(API, rec["pid"], alive, alive and process.http_ok(rec["health_url"]), rec["url"])
