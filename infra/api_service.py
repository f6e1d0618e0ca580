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
from collections.abc import Mapping
from pathlib import Path

from infra import pidfile, process
from infra.background import defectops_argv, recorded_status, stop_recorded, wait_healthy
from infra.services import OFFLINE_ENV, PortInUseError, ServicesConfig, ServiceStartError, ServiceStatus

logger = logging.getLogger(__name__)

API = "api"
STOP_TIMEOUT_S = 15.0


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
            argv = [*defectops_argv(), "api", "--root", str(root), "--host", host, "--port", str(port)]
            if params is not None:
                argv += ["--config", str(Path(params).resolve())]
            proc = process.launch(argv, env=env, cwd=Path.cwd(), log_file=log)
            url = probe_url(host, port)
            rec = pidfile.make_record(proc.pid, port, url, f"{url}/healthz", log, {})
            records[API] = rec
            pidfile.write_records(root, records)
            logger.info("%s: started pid %d, log %s", API, proc.pid, log)
    return wait_healthy(API, rec, proc, cfg.start_timeout_s if timeout_s is None else timeout_s, 0.3,
                        lambda: stop_api(root))


def stop_api(root: Path, term_timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the service (uvicorn finishes the requests in flight), SIGKILL after `term_timeout_s`; drop
    its record. True when it was running. The caller may hold the root lock."""
    return stop_recorded(root, API, term_timeout_s)


def api_status(root: Path) -> ServiceStatus | None:
    """The service's status when this root has a record of one (else None)."""
    return recorded_status(root, API)
