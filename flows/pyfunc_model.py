"""The registered model: an MLflow pyfunc defined by code ("models from code"), so no object of ours is
ever pickled. flows.registry.register_version logs this file, with the `components/` and `flows/` packages
as `code_paths` (so it loads where defectops is not installed), pinned requirements, and a `model_config` of

    {"bank_uri": "s3://BUCKET/models/LINE/SHA/MANIFEST.json", "bank_sha256": SHA}

At load time the model directory is fetched from the object store with `ObjectStore.get_dir`, which checks
the manifest against `bank_sha256` and every file against the manifest (a mismatch raises
`infra.storage.ChecksumError` and nothing is loaded), then `components.detector.load_detector` checks the
model's own manifest again. The endpoint and the credentials come from the environment of the process that
loads the model (DEFECTOPS_S3_ENDPOINT, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or DEFECTOPS_S3_*), never
from the model (versions registered before this rule carry an `endpoint`: it is used only when
DEFECTOPS_S3_ENDPOINT is unset).

    model = mlflow.pyfunc.load_model("models:/defectops-cookie@champion")
    model.predict(pd.DataFrame({"image": [png_bytes]}), params={"heatmap": True})
    model.predict(pd.DataFrame({"image_path": ["a.png", "b.png"]}))          # files on the scoring host
    # -> image_path, image_sha256, score, normalised_score, decision ("defective" | "good", the words `predict` and the service use; None without a
    #    threshold), threshold, heatmap (base64 PNG overlay when params={"heatmap": True}, else None)
    unified = mlflow.pyfunc.load_model("models:/defectops-unified-plant@champion")
    unified.predict(pd.DataFrame({"image": [png_bytes], "line": ["cookie"]}))  # cookie's threshold

`image` holds the encoded file (PNG, JPEG, BMP, TIFF) as bytes, or as base64 text; over HTTP
(`mlflow models serve`) it is base64 in JSON, decoded by MLflow's scoring server from the signature's
`binary` type. Every failure reaches the caller as an MlflowException with one clear message (the scoring
server answers it as MLflow's error JSON, 400 for bad input), never a traceback.

This file and flows/tracking.py are the only modules that import mlflow: an MLflow model defined by code
has to subclass `PythonModel` and call `set_model`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image

from components.capabilities import MultiLine
from components.data import DataError, Sample, iter_batches
from components.detector import Detector, load_detector
from components.prediction import DEFECTIVE, GOOD
from components.report import overlay
from components.training import preprocess_for, to_uint8_image
from infra.storage import ObjectStore, parse_uri

logger = logging.getLogger(__name__)

CONFIG_KEYS = ("bank_uri", "bank_sha256")
INPUT_COLUMNS = ("image", "image_path", "line")
OUTPUT_COLUMNS = ("image_path", "image_sha256", "score", "normalised_score", "decision", "threshold", "heatmap")
MAX_ROWS = int(os.environ.get("DEFECTOPS_PYFUNC_MAX_ROWS", "256"))
MAX_IMAGE_BYTES = int(os.environ.get("DEFECTOPS_PYFUNC_MAX_IMAGE_BYTES", str(32 * 1024 * 1024)))


class InputError(ValueError):
    """A request the model cannot score; the message names the row and the problem."""


def fetch_detector(config: Mapping[str, str], dest: Path, env: Mapping[str, str] | None = None) -> Detector:
    """Download the model directory named by `config` to `dest` (sha256-verified) and load it.

    config: bank_uri, bank_sha256. The endpoint is DEFECTOPS_S3_ENDPOINT from `env` (default: os.environ);
    a legacy `config["endpoint"]` is only a fallback when `env` has none. Credentials are read from `env`.
    Raises ValueError for an incomplete config, infra.storage.StorageError (ChecksumError on a mismatch)
    when the store refuses or the bytes differ.
    """
    missing = [key for key in CONFIG_KEYS if not config.get(key)]
    if missing:
        raise ValueError(f"model config lacks {missing}: cannot locate the model's bank in the object store")
    env = dict(os.environ if env is None else env)
    bucket, _ = parse_uri(config["bank_uri"])
    env["DEFECTOPS_BUCKET"] = bucket
    if not env.get("DEFECTOPS_S3_ENDPOINT") and config.get("endpoint"):
        logger.warning("DEFECTOPS_S3_ENDPOINT is unset: using the endpoint recorded in this (older) model, %s",
                       config["endpoint"])
        env["DEFECTOPS_S3_ENDPOINT"] = config["endpoint"]
    store = ObjectStore.from_env(env)
    store.get_dir(config["bank_uri"], Path(dest), config["bank_sha256"], overwrite=True)
    logger.info("fetched %s (sha256 %s…) from %s to %s", config["bank_uri"], config["bank_sha256"][:12],
                store.endpoint_url, dest)
    return load_detector(dest)


class DefectOpsModel(PythonModel):
    """Scores images with a detector fetched from the object store; see the module docstring."""

    def load_context(self, context) -> None:
        # Every torch call of this model (load and scoring) on one long-lived thread: MLflow's scoring server
        # answers requests from a pool of threads, and torch's OpenMP runtime slows every forward pass once
        # more than one long-lived thread has run torch kernels (flows/service/models.py says why).
        self._torch = ThreadPoolExecutor(1, thread_name_prefix="defectops-torch")
        self._workdir = tempfile.TemporaryDirectory(prefix="defectops-model-")
        self.detector = self._torch.submit(fetch_detector, context.model_config or {},
                                           Path(self._workdir.name) / "model").result()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """model_input: a DataFrame with an `image` (bytes or base64) or `image_path` column and, for a model
        trained on several lines (a unified model), a `line` column choosing each row's threshold -> one row
        per image, in order. params: {"heatmap": bool}. Failures: MlflowException with one message."""
        try:
            return self._torch.submit(predict_frame, self.detector, model_input,
                                      bool((params or {}).get("heatmap"))).result()
        except ValueError as exc:  # InputError, DataError, an unknown line of a unified model, nan scores
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
        except Exception as exc:  # noqa: BLE001 - the traceback goes to the server log, not the response
            logger.exception("scoring failed")
            raise MlflowException(f"scoring failed: {type(exc).__name__}: {exc}", INTERNAL_ERROR) from None


def normalised_scores(scores: np.ndarray, threshold: float) -> np.ndarray:
    """scores (N,) -> (N,) in [0, 1] with the threshold at 0.5 (anomalib's convention), as the inference
    service computes it (flows/service/scoring.normalise): 0.5 * score / threshold for a positive threshold
    (0 -> 0, 2x threshold -> 1), else 0.5 + (score - threshold); clipped to [0, 1]."""
    scores = np.asarray(scores, np.float64)
    value = 0.5 * scores / threshold if threshold > 0 else 0.5 + (scores - threshold)
    return np.clip(value, 0.0, 1.0)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _decode(value, row: int) -> bytes:
    """An `image` cell -> the encoded file's bytes (bytes as given, text as base64)."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"row {row}: 'image' is text but not valid base64") from None
    else:
        raise InputError(f"row {row}: 'image' must be bytes or base64 text, got {type(value).__name__}")
    if not data:
        raise InputError(f"row {row}: 'image' is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"row {row}: 'image' has {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}")
    return data


def _sources(frame: pd.DataFrame, workdir: Path) -> tuple[list[Path], list[str | None], list[str], dict]:
    """Each row's image as a file (bytes written under `workdir`) -> (files, image_path per row (None for
    bytes), sha256 per row, {file: how to name it in an error})."""
    files, paths, shas, labels = [], [], [], {}
    has_image, has_path = "image" in frame.columns, "image_path" in frame.columns
    for row in range(len(frame)):
        image = frame["image"].iloc[row] if has_image else None
        path = frame["image_path"].iloc[row] if has_path else None
        if _missing(image) == _missing(path):
            raise InputError(f"row {row}: give exactly one of 'image' (bytes or base64) and 'image_path'")
        if not _missing(image):
            data = _decode(image, row)
            file = workdir / f"row-{row}"
            file.write_bytes(data)
            files.append(file)
            paths.append(None)
            shas.append(hashlib.sha256(data).hexdigest())
            labels[file] = f"row {row} ('image' bytes)"
        else:
            file = Path(str(path))
            files.append(file)
            paths.append(str(path))
            shas.append(_file_sha256(file, row))
            labels[file] = f"row {row} ({path})"
    return files, paths, shas, labels


def _file_sha256(path: Path, row: int) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise InputError(f"row {row} ({path}): cannot read file: {exc.strerror or exc}") from None


def _check_frame(frame) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"predict expects a table (pandas DataFrame), got {type(frame).__name__}")
    if not {"image", "image_path"} & set(frame.columns):
        raise InputError(f"the input needs an 'image' (bytes or base64) or 'image_path' column; "
                         f"got columns {list(map(str, frame.columns))}")
    unknown = sorted(set(map(str, frame.columns)) - set(INPUT_COLUMNS))
    if unknown:
        raise InputError(f"unknown input columns {unknown}; known: {list(INPUT_COLUMNS)}")
    if not 0 < len(frame) <= MAX_ROWS:
        raise InputError(f"the input has {len(frame)} rows; send 1 to {MAX_ROWS} images per request")
    return frame


def predict_frame(detector: Detector, frame: pd.DataFrame, heatmap: bool = False) -> pd.DataFrame:
    """Score each row's image; rows are grouped by `frame.line` when present (detector.for_line(line) then
    supplies that line's threshold; an unknown line is a ValueError naming it). InputError for a bad
    request, naming the row."""
    frame = _check_frame(frame)
    n = len(frame)
    lines = [None if _missing(v) else str(v) for v in frame["line"]] if "line" in frame.columns else [None] * n
    out = {"score": np.zeros(n), "normalised_score": np.full(n, np.nan), "threshold": np.full(n, np.nan)}
    decisions: list[str | None] = [None] * n
    heatmaps: list[str | None] = [None] * n
    with tempfile.TemporaryDirectory(prefix="defectops-request-") as tmp:
        files, paths, shas, labels = _sources(frame, Path(tmp))
        for line in dict.fromkeys(lines):
            rows = [i for i, value in enumerate(lines) if value == line]
            det = detector.for_line(line) if line is not None and isinstance(detector, MultiLine) else detector
            scores, pngs = score_files(det, [files[i] for i in rows], heatmap, labels)
            threshold = getattr(det, "threshold_", None)
            out["score"][rows] = scores
            if threshold is not None:
                out["threshold"][rows] = threshold.image
                out["normalised_score"][rows] = normalised_scores(scores, threshold.image)
                for i, flag in zip(rows, threshold.decide_image(scores), strict=True):
                    decisions[i] = DEFECTIVE if flag else GOOD
            for i, png in zip(rows, pngs, strict=True):
                heatmaps[i] = png
    return pd.DataFrame({"image_path": paths, "image_sha256": shas, **{k: out[k] for k in ("score", "normalised_score")},
                         "decision": decisions, "threshold": out["threshold"], "heatmap": heatmaps},
                        columns=list(OUTPUT_COLUMNS))


def score_files(detector: Detector, files: list[Path], heatmap: bool = False,
                labels: Mapping[Path, str] | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Image scores (N,) of the image files, preprocessed as the detector was trained, and per image a
    base64 PNG overlay (heatmap, flagged regions outlined) when `heatmap`, else None. A bad file is an
    InputError named by `labels[file]` (default: its path)."""
    if not files:
        return np.zeros(0, dtype=np.float64), []
    data, threshold = detector.cfg.data, getattr(detector, "threshold_", None)
    pixel = threshold.pixel if threshold is not None else None
    samples = [Sample(Path(p), "unknown", 0) for p in files]
    scores, pngs = [], []
    try:
        for batch in iter_batches(samples, preprocess_for(data), data.batch_size, max_pixels=data.max_image_pixels):
            result = detector.score(batch.images)
            scores.append(np.asarray(result.image_scores, dtype=np.float64))
            for i in range(len(batch.samples)):
                pngs.append(_png_base64(overlay(to_uint8_image(batch.images[i]), result.anomaly_maps[i], pixel))
                            if heatmap else None)
    except DataError as exc:
        name = (labels or {}).get(exc.path, str(exc.path))
        raise InputError(f"{name}: {exc.reason}") from None
    return np.concatenate(scores), pngs


def _png_base64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


if __name__ != "flows.pyfunc_model":  # executed by MLflow as the model's code (not a plain import)
    set_model(DefectOpsModel())
