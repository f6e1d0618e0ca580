"""Before any alias moves: load the candidate from the object store through the path serving uses
(`pyfunc_model.fetch_detector`: manifest and every file sha256-verified) and score a few images with it.

    report = check_candidate(bank, model_dir, data_path, work / "candidate", line)
    report["repaired"], report["scored"]

A stored object whose bytes no longer match (a bit flipped under intact metadata, a truncated upload) is
uploaded again from the local model folder, then the fetch is retried once; if it still fails the run
fails with a `CandidateCheckError` naming the object. The scores of the fetched model must equal the local
model's, so a store that serves different bytes under the same name cannot reach `@champion`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from components.data import scan_line
from components.detector import load_detector
from flows.pyfunc_model import fetch_detector, score_files
from infra.storage import AccessDeniedError, EndpointUnreachableError, ObjectStore, StorageError

logger = logging.getLogger(__name__)

SCORED_IMAGES = 4


class CandidateCheckError(RuntimeError):
    """The candidate cannot be loaded from the store as serving would load it; the message names the object."""


def _fetch(bank: dict, dest: Path):
    return fetch_detector({"bank_uri": bank["uri"], "bank_sha256": bank["sha256"]}, dest)


def _repair(store: ObjectStore, bank: dict, model_dir: Path, prefix: list[str], exc: StorageError) -> list[str]:
    """Upload the local model folder again (put_dir re-reads every stored object and replaces the corrupt
    ones); -> the keys replaced. CandidateCheckError when the local folder is not the stored model."""
    logger.warning("stored candidate %s failed to load (%s); repairing it from %s", bank["uri"], exc, model_dir)
    if not Path(model_dir).is_dir():
        raise CandidateCheckError(f"stored object s3://{exc.bucket}/{exc.key} is corrupt ({exc.reason}) and the "
                                  f"local copy {model_dir} is gone: cannot repair it") from exc
    stored = store.put_dir(Path(model_dir), prefix)
    if stored.sha256 != bank["sha256"]:
        raise CandidateCheckError(f"stored object s3://{exc.bucket}/{exc.key} is corrupt ({exc.reason}) and "
                                  f"{model_dir} is not the model that was uploaded: cannot repair it") from exc
    return list(store.repaired)


def check_candidate(bank: dict, model_dir: str | Path, data_path: str | Path, dest: str | Path, prefix: list[str],
                    store: ObjectStore, n_images: int = SCORED_IMAGES) -> dict:
    """bank: {uri, sha256} of the uploaded model folder; model_dir: the local folder it came from; prefix: its
    key prefix (put_dir's). -> {"repaired": [keys], "scored": n, "max_abs_diff": float}."""
    dest, repaired = Path(dest), []
    try:
        detector = _fetch(bank, dest)
    except (EndpointUnreachableError, AccessDeniedError):
        raise
    except StorageError as exc:
        repaired = _repair(store, bank, Path(model_dir), prefix, exc)
        try:
            detector = _fetch(bank, dest)
        except StorageError as again:
            raise CandidateCheckError(f"stored object s3://{again.bucket}/{again.key} still fails after a repair "
                                      f"from {model_dir}: {again.reason}") from again
    split = scan_line(data_path)
    files = [s.path for s in (*split.test, *split.train)][:max(1, n_images)]
    fetched, _ = score_files(detector, files)
    local, _ = score_files(load_detector(model_dir), files)
    diff = float(np.max(np.abs(fetched - local))) if len(files) else 0.0
    if not np.all(np.isfinite(fetched)) or not np.allclose(fetched, local, rtol=1e-5, atol=1e-6):
        raise CandidateCheckError(f"the model fetched from {bank['uri']} scores {len(files)} images differently "
                                  f"from the local model {model_dir} (max |diff| {diff:.3g}, finite: "
                                  f"{bool(np.all(np.isfinite(fetched)))}): not promoting it")
    return {"repaired": repaired, "scored": len(files), "max_abs_diff": diff}
