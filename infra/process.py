"""Process and port plumbing for the local services: launch in a new session, identify, stop, probe.

Linux-first: a pid is identified by its start time in ``/proc/<pid>/stat`` so that a recycled pid is never
signalled. Every launched process leads its own process group (``start_new_session=True``), so stopping
the group also stops the workers a server forked.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Ports the helpers hand out: below Linux's ephemeral range (32768+) so that they never collide with the
# source port of an outgoing connection, and low enough that port + 10000 (SeaweedFS's gRPC offset) fits.
_PORT_RANGE = (15000, 22700)

# Popen handles of the children this interpreter started, so that they are reaped (no zombie keeps a
# stopped server looking alive).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class PortInUseError(RuntimeError):
    """A service's port is already taken by another process."""


def port_state(host: str, port: int) -> str:
    """Return ``"free"``, ``"in_use"`` (something listens) or ``"lingering"`` (only TIME_WAIT sockets).

    ``lingering`` matters for SeaweedFS: its own port check binds without SO_REUSEADDR and refuses a port
    that a just-stopped instance left in TIME_WAIT (about 60 s on Linux); uvicorn-based servers do not care.
    """
    if _can_bind(host, port, reuse=False):
        return "free"
    return "lingering" if _can_bind(host, port, reuse=True) else "in_use"


def _can_bind(host: str, port: int, *, reuse: bool) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1 if reuse else 0)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def find_free_ports(host: str, count: int, *, offset: int | None = None, avoid: Sequence[int] = ()) -> list[int]:
    """``count`` distinct ports that are free on ``host`` now (and ``port + offset`` too, when given).

    Free now, not reserved: another process may still take one before it is bound, as with any such helper.
    """
    chosen: list[int] = []
    taken = set(avoid)
    for _ in range(2000):
        if len(chosen) == count:
            return chosen
        port = random.randint(*_PORT_RANGE)
        wanted = [port] if offset is None else [port, port + offset]
        if any(p in taken for p in wanted) or not all(port_state(host, p) == "free" for p in wanted):
            continue
        chosen.append(port)
        taken.update(wanted)
    raise PortInUseError(f"could not find {count} free ports on {host} in {_PORT_RANGE}")


def launch(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_file: Path, popen_kwargs: Mapping | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log_file`` (``popen_kwargs``: e.g.
    ``user``/``group`` for a server that must not run as root)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            **dict(popen_kwargs or {}),
        )
    _CHILDREN[proc.pid] = proc
    return proc


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None when unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def is_alive(pid: int, expected_start: str | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, when given, started at ``expected_start``."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not Path("/proc").is_dir():
        return True
    actual = start_time(pid)
    return actual is not None and (expected_start is None or actual == expected_start)


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def _group_alive(pgid: int) -> bool:
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Only a zombie leader left (reaped by its own parent later) counts as gone.
    return start_time(pgid) is not None or _has_other_members(pgid)


def _has_other_members(pgid: int) -> bool:
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry.name) != pgid and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(pid: int, *, term_timeout_s: float = 15.0, kill_timeout_s: float = 5.0,
               first: signal.Signals = signal.SIGTERM) -> str:
    """``first`` (SIGTERM; PostgreSQL's fast shutdown is SIGINT) to the process group led by ``pid``, wait,
    then SIGKILL it.

    Returns ``"gone"`` (nothing left to signal), ``"terminated"`` or ``"killed"``.
    """
    outcome = "gone"
    for sig, timeout in ((first, term_timeout_s), (signal.SIGKILL, kill_timeout_s)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return outcome
        outcome = "terminated" if sig != signal.SIGKILL else "killed"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return outcome
            time.sleep(0.05)
    return outcome


def http_ok(url: str, *, timeout_s: float = 2.0) -> bool:
    """True when ``url`` answers 200 within ``timeout_s``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (loopback URLs only)
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ("" when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------- who runs a record
def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def process_holder() -> str:
    """host:pid:start-time of this process (the start time tells a recycled pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid()) or '?'}"


def holder_gone(holder: str) -> bool:
    """True when `holder` is a process on this host that no longer runs (killed, even with SIGKILL)."""
    host, _, rest = holder.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or start == "?":
        return False
    return _process_start(int(pid)) != start
