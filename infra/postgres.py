"""A local PostgreSQL cluster for MLflow's backend store and Prefect's database (``services.database:
postgresql``, issue 16), under ``ROOT/postgres/``.

- Debian's server binaries (``/usr/lib/postgresql/<version>/bin``, package ``postgresql``; ``make install``
  installs it when missing), found at start; nothing else is needed.
- The server listens on 127.0.0.1 only, on a port drawn once and kept in ``ROOT/postgres/port``, with no
  Unix socket; every connection needs the password (SCRAM), generated once into
  ``ROOT/service-secrets.json`` (``postgres_password``, 0600). Passwords reach the servers through their
  environment, never their command line.
- PostgreSQL refuses to run as root: when defectops runs as root the cluster belongs to and runs as the
  ``postgres`` system user (``DEFECTOPS_POSTGRES_USER`` names another): the services root is then
  opened to that user's group for passing through (0710), and no folder above it may be private to root.
- Stopped with SIGINT (fast shutdown: open sessions are rolled back, the cluster is left consistent).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.logins import write_private_text

DB_USER = "defectops"
DATABASES = ("mlflow", "prefect")
USER_ENV = "DEFECTOPS_POSTGRES_USER"
_SEARCH = Path("/usr/lib/postgresql")


class PostgresError(RuntimeError):
    """The cluster could not be found, made or reached; the message names the folder or binary."""


@dataclass(frozen=True)
class RunAs:
    """Who the server runs as: ``None`` fields mean the current user."""

    name: str | None = None
    uid: int | None = None
    gid: int | None = None

    def popen_kwargs(self) -> dict:
        return {} if self.uid is None else {"user": self.uid, "group": self.gid, "extra_groups": []}


def binary(name: str) -> str:
    """A PostgreSQL program: the newest ``/usr/lib/postgresql/*/bin/NAME``, else ``NAME`` on PATH."""
    versions = sorted((p for p in _SEARCH.glob("*/bin") if p.parent.name.isdigit()),
                      key=lambda p: int(p.parent.name), reverse=True) if _SEARCH.is_dir() else []
    for folder in versions:
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if not found:
        raise PostgresError(f"PostgreSQL's {name} not found (looked in {_SEARCH}/*/bin and PATH): install "
                            "Debian's postgresql package (`make install` does), or use services.database: sqlite")
    return found


def run_as() -> RunAs:
    if os.geteuid() != 0:
        return RunAs()
    name = os.environ.get(USER_ENV, "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PostgresError(f"PostgreSQL refuses to run as root and there is no user {name!r} to run it as: "
                            f"install Debian's postgresql package (it creates 'postgres') or set {USER_ENV}"
                            ) from None
    if entry.pw_uid == 0:
        raise PostgresError(f"{USER_ENV}={name!r} is root; PostgreSQL refuses to run as root")
    return RunAs(name, entry.pw_uid, entry.pw_gid)


def port_of(home: Path) -> int | None:
    try:
        return int((home / "port").read_text().strip())
    except (OSError, ValueError):
        return None


def initialised(home: Path) -> bool:
    return (home / "data" / "PG_VERSION").is_file()


def init_cluster(home: Path, password: str, port: int, who: RunAs) -> None:
    """``initdb`` a new cluster in ``home/data`` (superuser ``defectops``, SCRAM on every connection, UTF-8,
    C locale) unless one is there; on failure nothing half-made is left."""
    if not initialised(home):
        home.mkdir(parents=True, exist_ok=True)
        _own(home, who)
        _let_through(home.parent, who)
        _check_reachable(home, who)
        data = home / "data"
        if data.exists():  # a previous initdb died half-way: nothing in it was ever used
            shutil.rmtree(data)
        pwfile = home / ".initdb-password"
        write_private_text(pwfile, password + "\n")
        _own(pwfile, who)
        argv = [binary("initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                "-E", "UTF8", "--locale=C", "--no-instructions"]
        try:
            done = subprocess.run(argv, cwd=home, capture_output=True, text=True, timeout=300, check=False,
                                  **who.popen_kwargs())
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise PostgresError(f"initdb failed for {data} (exit {done.returncode}):\n{tail}")
    if port_of(home) != port:
        (home / "port").write_text(f"{port}\n")


def server_argv(home: Path, port: int) -> tuple[str, ...]:
    return (binary("postgres"), "-D", str(home / "data"), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=", "-c", "logging_collector=off")


def ready(url: str, *, timeout_s: float = 2.0) -> bool:
    """``pg_isready`` on ``postgresql://HOST:PORT``: the server accepts connections."""
    match = re.fullmatch(r"postgresql://([\d.]+):(\d+)", url)
    if not match:
        return False
    try:
        done = subprocess.run([binary("pg_isready"), "-q", "-h", match[1], "-p", match[2], "-t",
                               str(max(1, int(timeout_s)))], capture_output=True, timeout=timeout_s + 3, check=False)
    except (PostgresError, subprocess.TimeoutExpired, OSError):
        return False
    return done.returncode == 0


def ensure_databases(port: int, password: str) -> list[str]:
    """Create the ``mlflow`` and ``prefect`` databases that do not exist yet; return those created."""
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    base = [binary("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER,
            "-d", "postgres", "-tA", "-c"]

    def psql(sql: str) -> str:
        done = subprocess.run([*base, sql], env=env, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise PostgresError(f"postgres on 127.0.0.1:{port}: {sql!r} failed: {done.stderr.strip()[-300:]}")
        return done.stdout

    present = set(psql("SELECT datname FROM pg_database").split())
    created = [name for name in DATABASES if name not in present]
    for name in created:
        psql(f"CREATE DATABASE {name}")
    return created


def mlflow_backend_uri(port: int) -> str:
    """MLflow's backend store URI; the password goes in the server's ``PGPASSWORD`` (libpq reads it)."""
    return f"postgresql://{DB_USER}@127.0.0.1:{port}/mlflow"


def prefect_env(port: int, password: str) -> dict[str, str]:
    return {"PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg", "PREFECT_SERVER_DATABASE_HOST": "127.0.0.1",
            "PREFECT_SERVER_DATABASE_PORT": str(port), "PREFECT_SERVER_DATABASE_USER": DB_USER,
            "PREFECT_SERVER_DATABASE_NAME": "prefect", "PREFECT_SERVER_DATABASE_PASSWORD": password}


def prepare_tmp(folder: Path, who: RunAs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _own(folder, who)


def _own(path: Path, who: RunAs) -> None:
    if who.uid is not None:
        os.chown(path, who.uid, who.gid)
    os.chmod(path, 0o700 if path.is_dir() else 0o600)


def _let_through(root: Path, who: RunAs) -> None:
    """The services root is private (0700): let the server's group, and no one else, pass through it (0710,
    group of the server's user) so that the server reaches its cluster folder."""
    if who.uid is None:
        return
    mode = root.stat().st_mode & 0o777
    if not mode & 0o001 and (root.stat().st_gid != who.gid or not mode & 0o010):
        os.chown(root, -1, who.gid)
        os.chmod(root, (mode & 0o707) | 0o010)


def _check_reachable(home: Path, who: RunAs) -> None:
    if who.uid is None:
        return
    done = subprocess.run(["test", "-w", str(home)], capture_output=True, timeout=30, check=False,
                          **who.popen_kwargs())
    if done.returncode != 0:
        blocked = next((str(p) for p in reversed(home.parents) if not os.stat(p).st_mode & 0o001), str(home))
        raise PostgresError(f"PostgreSQL runs as user {who.name!r} (it refuses root), and {who.name!r} cannot "
                            f"reach {home}: {blocked} is not searchable by others. Put services.root under a "
                            "folder others can traverse, or run defectops as an ordinary user")


__all__ = ["DATABASES", "DB_USER", "PostgresError", "RunAs", "binary", "ensure_databases", "init_cluster",
           "initialised", "mlflow_backend_uri", "port_of", "prefect_env", "prepare_tmp",
           "ready", "run_as", "server_argv"]
