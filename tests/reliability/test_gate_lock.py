"""The promotion gate lock (issue 16, 17): a flock'd file on the services root, not a registered model. A
holder killed with SIGKILL leaves nothing held; a second gate waits for the first; a waiter that gives up
names the holder; nothing about the lock appears in the model registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows import promote, tracking
from infra.locks import is_held
from tests.e2e.tiny_line import unique_name

HOLD = """
import sys, time
from flows import promote, tracking
from pathlib import Path
tracking.configure(root=Path(sys.argv[1]))
with promote.gate_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(root, name: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), name, str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_gate_leaves_no_lock_and_a_waiter_names_the_holder(env, record):
    name = unique_name("defectops-lock")
    root = tracking.services_root()
    proc = _holder(root, name, 60)
    try:
        path = promote.gate_lock_path(name)
        assert is_held(path)
        with pytest.raises(tracking.RegistryError, match=f"still held by .*:{proc.pid} since"):
            with promote.gate_lock(name, timeout_s=0.5):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        record("fault", "gate lock holder SIGKILLed: the lock is free at once, nothing to break")
        assert not is_held(path)
        with promote.gate_lock(name, timeout_s=5) as holder:
            assert holder.endswith(f":{os.getpid()}") and is_held(path)
        assert not is_held(path)
    finally:
        proc.kill()
    assert not [m for m in tracking.client().search_registered_models(f"name LIKE '{name}%'")]


def test_a_second_gate_waits_for_the_first(env):
    name = unique_name("defectops-lock")
    proc = _holder(tracking.services_root(), name, 1.5)
    try:
        t0 = time.monotonic()
        with promote.gate_lock(name, timeout_s=30):
            waited = time.monotonic() - t0
        assert waited > 0.5 and proc.wait(timeout=10) == 0
    finally:
        proc.kill()
