"""`defectops gc` (issue 16, crash debris): a killed retrain's model folder is listed, then removed with
--delete; every object a registered version references is kept and still verifies; a dry run deletes nothing."""

from __future__ import annotations

import pytest

from flows import registry, tracking
from flows.gc import collect
from tests.e2e.tiny_line import unique_name, version_tags


def test_gc_removes_only_unreferenced_model_objects(env, tiny, record):
    state, store = env
    kept_prefix, orphan_prefix = f"models/{unique_name('gc')}", f"models/{unique_name('gc')}"
    kept = store.put_dir(tiny.model_dir, kept_prefix)
    orphan = store.put_dir(tiny.model_dir, orphan_prefix)  # what a retrain killed before registering leaves
    name = unique_name("defectops-gc")
    run_id = tracking.start_run("gc", "gc-test", {"kind": "test"})
    registry.register_version(run_id, name, kept, state.s3_endpoint, version_tags(tiny))
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


def test_gc_dvc_keeps_every_committed_revision_and_removes_an_orphan(env, tmp_path, record):
    """--dvc: objects of every commit of the data registry (an older revision of the line included) are kept;
    an object no commit references is removed. A bucket of its own: the shared one holds other registries'."""
    import os

    from flows import versioning
    from flows.gc import GcError, dvc_key, dvc_referenced_keys
    from infra.storage import ObjectStore
    from tests.e2e.tiny_line import make_line

    state, _ = env
    bucket = unique_name("gc-dvc").lower()
    store = ObjectStore(state.s3_endpoint, bucket, state.access_key, state.secret_key)
    store.ensure_bucket()
    env_vars = {**os.environ, "DEFECTOPS_BUCKET": bucket, "DEFECTOPS_S3_ENDPOINT": state.s3_endpoint,
                "AWS_ACCESS_KEY_ID": state.access_key, "AWS_SECRET_ACCESS_KEY": state.secret_key}
    repo = tmp_path / "data-registry"
    with pytest.raises(GcError, match="not a data registry"):
        dvc_referenced_keys(repo)
    first = versioning.version_line("gcline", make_line(tmp_path / "v1", seed=1), repo, env=env_vars)
    second = versioning.version_line("gcline", make_line(tmp_path / "v2", seed=2), repo, env=env_vars)
    assert first.dvc_md5 != second.dvc_md5
    orphan = store.put_bytes(b"pushed by a registry that is gone", ["dvc", "files", "md5", "ff"], "orphan")
    pushed = {k for k, _, _ in store.list_objects("dvc/")}
    refs = dvc_referenced_keys(repo)
    assert dvc_key(first.dvc_md5) in refs and dvc_key(second.dvc_md5) in refs
    dry = collect(store, min_age_s=0, prefixes=(), dvc_registry=repo)
    assert dry["unreferenced"] == [orphan.key]
    collect(store, min_age_s=0, delete=True, prefixes=(), dvc_registry=repo)
    record("fault", "gc --dvc: an orphaned DVC object removed, both revisions of the line kept")
    assert {k for k, _, _ in store.list_objects("dvc/")} == pushed - set(dry["unreferenced"])
    assert refs <= pushed  # every referenced object is in the remote (first revision included)
