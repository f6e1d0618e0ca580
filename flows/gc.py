"""`defectops gc`: remove model and export objects that no registered version references (dry run unless
`delete=True`). A killed retrain leaves its uploaded model folder behind; nothing else ever removes it.

    report = collect(store, min_age_s=6 * 3600, delete=False)
    report["unreferenced"], report["bytes"], report["deleted"]

References: every version of every registered model (gate locks excepted): its `bank_uri` / `export.uri`
manifest and every file the manifest lists. If any of them cannot be read, nothing is deleted (a reference
that cannot be resolved would make its objects look unreferenced). Objects younger than `min_age_s` are
kept: a running retrain has uploaded its model before registering it. `models/` and `exports/` are collected;
MLflow's `mlflow/` artifacts and `inference/` results are left alone.

DVC's `dvc/` objects are collected only when asked (`dvc_registry=`, `defectops gc --dvc`): kept is every
object any commit of the data registry references (each `*.dvc` file of every commit, and every file its
directory listing names, read from the registry's cache and checked against its md5), under the registry's
lock, so a retrain versioning data meanwhile waits. Ask for it only when this registry is the one writer of
the bucket's `dvc/` prefix: another registry's objects would look unreferenced. A registry without commits,
or a listing that cannot be read, collects nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import yaml

from flows import registry
from flows.versioning import git_out, registry_lock
from infra.storage import ObjectStore, StorageError

logger = logging.getLogger(__name__)

PREFIXES = ("models/", "exports/")
DVC_PREFIX = "dvc/"
REFERENCE_TAGS = (("bank_uri", "bank_sha256"), ("export.uri", "export.sha256"))


class GcError(RuntimeError):
    """A reference could not be resolved: nothing was deleted."""


def referenced_keys(store: ObjectStore) -> set[str]:
    """Keys of every object a registered version references (see the module docstring)."""
    keys: set[str] = set()
    for name in registry.registered_model_names():
        for info in registry.list_versions(name):
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


def dvc_key(md5: str) -> str:
    """The remote key DVC 3 keeps an object under (flows.versioning.remote_path without the bucket)."""
    return f"{DVC_PREFIX}files/md5/{md5[:2]}/{md5[2:]}"


def _git(repo: Path, *args: str) -> str:
    rc, out = git_out(repo, *args, timeout=120)
    if rc != 0:
        raise GcError(f"{repo}: git {' '.join(args)} failed ({out[:200]}): nothing deleted")
    return out


def dvc_referenced_keys(repo: Path) -> set[str]:
    """Keys of every DVC object some commit of the data registry `repo` references (module docstring).
    GcError (nothing deleted) when the registry has no commits or a directory listing cannot be read."""
    if not (Path(repo) / ".git").is_dir():
        raise GcError(f"{repo}: not a data registry (no git repository): DVC objects not collected")
    commits = _git(repo, "rev-list", "--all").split()
    if not commits:
        raise GcError(f"{repo}: the data registry has no commits: DVC objects not collected")
    keys: set[str] = set()
    for commit in commits:
        for path in _git(repo, "ls-tree", "-r", "--name-only", commit).split("\n"):
            if not path.endswith(".dvc"):
                continue
            outs = (yaml.safe_load(_git(repo, "show", f"{commit}:{path}")) or {}).get("outs") or []
            for out in outs:
                md5 = str(out.get("md5") or "")
                if md5:
                    keys.add(dvc_key(md5))
                    if md5.endswith(".dir"):
                        keys |= {dvc_key(e["md5"]) for e in _dir_listing(Path(repo), md5)}
    return keys


def _dir_listing(repo: Path, md5: str) -> list[dict]:
    """The entries of a DVC directory object from the registry's cache, its md5 checked."""
    path = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GcError(f"{path}: directory listing of {md5} not in the registry's cache ({exc.strerror}): "
                      "nothing deleted (`dvc fetch` in the registry restores it)") from None
    if hashlib.md5(data).hexdigest() != md5.removesuffix(".dir"):
        raise GcError(f"{path}: content does not match its md5 {md5}: nothing deleted")
    return json.loads(data)


def collect(store: ObjectStore, min_age_s: float = 6 * 3600, delete: bool = False,
            prefixes: tuple[str, ...] = PREFIXES, dvc_registry: Path | None = None) -> dict:
    """Unreferenced objects under `prefixes` (and, with `dvc_registry`, under `dvc/`) older than `min_age_s`;
    deleted only when `delete`."""
    with registry_lock(Path(dvc_registry)) if dvc_registry is not None else nullcontext():
        refs = referenced_keys(store)
        if dvc_registry is not None:
            refs |= dvc_referenced_keys(Path(dvc_registry))
            prefixes = (*prefixes, DVC_PREFIX)
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
