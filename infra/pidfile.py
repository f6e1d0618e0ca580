"""``ROOT/pids.json``: which service runs with which pid, ports, URLs and log; and the per-root lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from infra import process

logger = logging.getLogger(__name__)

PIDS_FILE = "pids.json"


def read_records(root: Path) -> dict[str, dict]:
    path = root / PIDS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; ignoring it", path)
        return {}


def write_records(root: Path, records: Mapping[str, dict]) -> None:
    path = root / PIDS_FILE
    if not records:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{PIDS_FILE}.tmp")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
    os.replace(tmp, path)


def make_record(pid: int, port: int, url: str, health_url: str, log: Path, extra_ports: Mapping[str, int]) -> dict:
    return {"pid": pid, "start_time": process.start_time(pid), "port": port, "url": url,
            "health_url": health_url, "log": str(log), "extra_ports": dict(extra_ports)}


def running(record: Mapping | None) -> bool:
    return bool(record) and process.is_alive(record["pid"], record.get("start_time"))


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One start or stop at a time per root (an flock on ROOT/.lock)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
