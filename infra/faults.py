"""Named fault points for the reliability tests: a no-op unless DEFECTOPS_FAULT_PAUSE names the point.

    faults.reached("extract")   # in the flow, at the step the tests interrupt

With ``DEFECTOPS_FAULT_PAUSE=extract,register`` and ``DEFECTOPS_FAULT_DIR=/some/dir`` set, the process
writes ``/some/dir/<point>.<pid>.reached`` when it reaches a named point and waits until the
test creates ``<point>.release`` (or ``DEFECTOPS_FAULT_TIMEOUT_S``, default 300 s, passes), so the test
can stop a server, kill the process with SIGKILL or start a rival run at exactly that step. In production
the variable is unset and `reached` returns at once; it never raises and never changes what a step does.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PAUSE_ENV, DIR_ENV, TIMEOUT_ENV = "DEFECTOPS_FAULT_PAUSE", "DEFECTOPS_FAULT_DIR", "DEFECTOPS_FAULT_TIMEOUT_S"


def armed(point: str) -> bool:
    """True when DEFECTOPS_FAULT_PAUSE (comma-separated) names `point` and DEFECTOPS_FAULT_DIR is set."""
    names = {p.strip() for p in os.environ.get(PAUSE_ENV, "").split(",") if p.strip()}
    return point in names and bool(os.environ.get(DIR_ENV))


def reached(point: str) -> None:
    """Announce `point` and wait for the test to release it (see the module docstring); else no-op."""
    if not armed(point):
        return
    folder = Path(os.environ[DIR_ENV])
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "300"))
    except ValueError:
        timeout = 300.0
    release = folder / f"{point}.release"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f".{point}.{os.getpid()}.tmp").write_text(str(os.getpid()))
        os.replace(folder / f".{point}.{os.getpid()}.tmp", folder / f"{point}.{os.getpid()}.reached")
    except OSError as exc:  # a fault hook must never become the fault
        logger.warning("fault point %s: cannot write to %s: %s", point, folder, exc)
        return
    logger.warning("fault point %s reached (pid %d): waiting for %s", point, os.getpid(), release)
    deadline = time.monotonic() + timeout
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
