"""`defectops gc`: remove model and export objects that no registered version references (dry run unless
`delete=True`). A killed retrain leaves its uploaded model folder behind; nothing else ever removes it.

    report = collect(store, min_age_s=6 * 3600, delete=False)
    report["unreferenced"], report["bytes"], report["deleted"]

References: every version of every registered model (gate locks excepted): its `bank_uri` / `export.uri`
manifest and every file the manifest lists. If any of them cannot be read, nothing is deleted (a reference
that cannot be resolved would make its objects look unreferenced). Objects younger than `min_age_s` are
kept: a running retrain has uploaded its model before registering it. Only `models/` and `exports/` are
collected: DVC's `dvc/` cache, MLflow's `mlflow/` artifacts and `inference/` results are left alone.
"""

from __future__ import annotations

import logging
import time

from flows import tracking
from flows.storage import ObjectStore, StorageError

logger = logging.getLogger(__name__)

PREFIXES = ("models/", "exports/")
REFERENCE_TAGS = (("bank_uri", "bank_sha256"), ("export.uri", "export.sha256"))


class GcError(RuntimeError):
    """A reference could not be resolved: nothing was deleted."""


def referenced_keys(store: ObjectStore) -> set[str]:
    """Keys of every object a registered version references (see the module docstring)."""
    keys: set[str] = set()
    for name in tracking.registered_model_names():
        for info in tracking.list_versions(name):
            for uri_tag, sha_tag in REFERENCE_TAGS:
                uri, sha = info["tags"].get(uri_tag), info["tags"].get(sha_tag)
                if not uri or not sha:
                    continue
                try:
                    keys |= store.dir_keys(uri, sha)
                except StorageError as exc:
                    raise GcError(f"{name} version {info['version']}: {uri_tag} {uri} cannot be read "
                                  f"({exc.reason}): nothing deleted") from exc
    return keys


def collect(store: ObjectStore, min_age_s: float = 6 * 3600, delete: bool = False,
            prefixes: tuple[str, ...] = PREFIXES) -> dict:
    """Unreferenced objects under `prefixes` older than `min_age_s`; deleted only when `delete`."""
    refs = referenced_keys(store)
    now, unreferenced, size = time.time(), [], 0
    for prefix in prefixes:
        for key, nbytes, modified in store.list_objects(prefix):
            if key not in refs and now - modified >= min_age_s:
                unreferenced.append(key)
                size += nbytes
    if delete:
        for key in unreferenced:
            store.delete(key)
        logger.info("gc: deleted %d unreferenced objects (%d bytes)", len(unreferenced), size)
    return {"referenced": len(refs), "unreferenced": sorted(unreferenced), "bytes": size, "deleted": delete}
