"""The promotion gate lock is broken by compare-and-delete (issue 16): a waiter that read a stale lock never
deletes the fresh lock another waiter took meanwhile, and a dead holder's lock is still broken."""

from __future__ import annotations

import time

from flows import tracking
from tests.e2e.tiny_line import unique_name


def _take(lock: str, holder: str, since: float) -> None:
    tracking._client().create_registered_model(lock, tags={"defectops.lock.holder": holder,
                                                           "defectops.lock.since": f"{since:.3f}"})


def test_a_stale_view_never_deletes_a_fresh_lock(env, record):
    name = unique_name("defectops-lock")
    lock = name + tracking.GATE_LOCK_SUFFIX
    stale_holder, stale_since = "otherhost:1:0", f"{time.time() - 7200:.3f}"
    _take(lock, stale_holder, float(stale_since))
    # waiter B broke the stale lock and took a fresh one; waiter A still acts on what it read before
    assert tracking.break_stale_lock(lock, stale_holder, stale_since)
    fresh = tracking.lock_holder()
    _take(lock, fresh, time.time())
    deleted = tracking.break_stale_lock(lock, stale_holder, stale_since)
    record("fault", "two waiters breaking one stale gate lock: the fresh lock survives (compare-and-delete)")
    assert not deleted
    assert tracking._client().get_registered_model(lock).tags["defectops.lock.holder"] == fresh
    tracking.release_gate_lock(name, fresh)
    # a lock older than stale_s is taken over by acquire_gate_lock, and released after
    _take(lock, stale_holder, time.time() - 7200)
    holder = tracking.acquire_gate_lock(name, timeout_s=30, stale_s=3600, poll_s=0.1)
    assert tracking._client().get_registered_model(lock).tags["defectops.lock.holder"] == holder
    tracking.release_gate_lock(name, holder)
