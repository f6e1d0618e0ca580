"""The retrain flow's feature cache: patch embeddings of the fit images in `<cache_dir>/<key>.safetensors`,
keyed by what they depend on, with the file's sha256 recorded beside it (`<key>.safetensors.sha256`) and
checked on every read. A missing, partial or flipped file is a miss (recomputed); a cache that cannot be
written (disk full, quota) is skipped with a warning: the flow then fits from the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from infra.storage import sha256_file

logger = logging.getLogger(__name__)


def feature_cache_key(feature_key: dict, data_hash: str, fit_files: list[str]) -> str:
    """sha256 of what the patch embeddings depend on: backbone, weights sha256, preprocessing, the data
    version and the exact images fitted (the calibration hold-out depends on data.seed/fraction)."""
    payload = {"features": feature_key, "data": data_hash, "fit_files": fit_files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cached_features_sha256(path: Path) -> str | None:
    """The sha256 of a feature cache file when it matches the one recorded beside it (`<file>.sha256`),
    else None: a missing, partial, flipped or unrecorded file is a cache miss (and is removed)."""
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return None
    try:
        recorded, actual = side.read_text().strip(), sha256_file(path)
    except OSError:
        recorded, actual = "", "unreadable"
    if recorded == actual:
        return actual
    logger.warning("feature cache %s does not match its recorded sha256: recomputing it", path)
    for stale in (path, side):
        stale.unlink(missing_ok=True)
    return None


def write_cached_features(path: Path, features) -> str | None:
    """Write features (N, D) to the cache (temp file, then renamed) with its sha256 beside it; returns the
    sha256, or None when the cache cannot be written (disk full, quota): the caller fits from the images."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    side = path.with_name(path.name + ".sha256")
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": features.contiguous()}, str(tmp))
        sha = sha256_file(tmp)
        side_tmp.write_text(sha + "\n")
        os.replace(tmp, path)
        os.replace(side_tmp, side)
        return sha
    except (OSError, SafetensorError) as exc:
        logger.warning("feature cache not written (%s: %s): fitting from the images instead", path.parent, exc)
        for leftover in (tmp, side_tmp, path, side):
            leftover.unlink(missing_ok=True)
        return None
