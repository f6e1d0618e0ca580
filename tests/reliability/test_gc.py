"""`defectops gc` (issue 16, crash debris): a killed retrain's model folder is listed, then removed with
--delete; every object a registered version references is kept and still verifies; a dry run deletes nothing."""

from __future__ import annotations

from flows import tracking
from flows.gc import collect
from tests.e2e.tiny_line import unique_name, version_tags


def test_gc_removes_only_unreferenced_model_objects(env, tiny, record):
    state, store = env
    kept_prefix, orphan_prefix = f"models/{unique_name('gc')}", f"models/{unique_name('gc')}"
    kept = store.put_dir(tiny.model_dir, kept_prefix)
    orphan = store.put_dir(tiny.model_dir, orphan_prefix)  # what a retrain killed before registering leaves
    name = unique_name("defectops-gc")
    run_id = tracking.start_run("gc", "gc-test", {"kind": "test"})
    tracking.register_version(run_id, name, kept, state.s3_endpoint, version_tags(tiny))
    tracking.end_run(run_id)
    prefixes = (kept_prefix + "/", orphan_prefix + "/")
    orphan_keys = {k for k, _, _ in store.list_objects(orphan_prefix + "/")}
    young = collect(store, min_age_s=3600, prefixes=prefixes)
    dry = collect(store, min_age_s=0, prefixes=prefixes)
    assert store.list_objects(orphan_prefix + "/")  # the dry run deleted nothing
    done = collect(store, min_age_s=0, delete=True, prefixes=prefixes)
    record("fault", "gc: a killed run's orphaned model folder removed, referenced objects kept")
    assert young["unreferenced"] == []  # too young: a running retrain may still register it
    assert set(dry["unreferenced"]) == orphan_keys and len(orphan_keys) >= 3
    assert set(done["unreferenced"]) == orphan_keys and store.list_objects(orphan_prefix + "/") == []
    assert all(store.verify_dir(kept.uri, kept.sha256).values())
    assert not store.exists(orphan.uri)
