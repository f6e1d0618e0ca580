"""The registered model: an MLflow pyfunc defined by code ("models from code"), so no object of ours is
ever pickled. flows.tracking.register_version logs this file with a `model_config` of

    {"bank_uri": "s3://BUCKET/models/LINE/SHA/MANIFEST.json", "bank_sha256": SHA, "endpoint": "http://..."}

At load time the model directory is fetched from the object store with `ObjectStore.get_dir`, which checks
the manifest against `bank_sha256` and every file against the manifest (a mismatch raises
`flows.storage.ChecksumError` and nothing is loaded), then `components.detector.load_detector` checks the
model's own manifest again. Credentials come from the environment of the process that loads the model
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or DEFECTOPS_S3_*), never from the model.

    model = mlflow.pyfunc.load_model("models:/defectops-cookie@champion")
    model.predict(pd.DataFrame({"image_path": ["a.png", "b.png"]}))
    # -> image_path, score, decision ("anomalous" | "good"; None without a threshold), threshold
    unified = mlflow.pyfunc.load_model("models:/defectops-unified-plant@champion")
    unified.predict(pd.DataFrame({"image_path": ["a.png"], "line": ["cookie"]}))  # cookie's threshold

This file and flows/tracking.py are the only modules that import mlflow: an MLflow model defined by code
has to subclass `PythonModel` and call `set_model`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from components.data import Sample, iter_batches
from components.detector import Detector, load_detector
from components.training import preprocess_for
from flows.storage import ObjectStore, parse_uri

logger = logging.getLogger(__name__)

CONFIG_KEYS = ("bank_uri", "bank_sha256", "endpoint")
OUTPUT_COLUMNS = ("image_path", "score", "decision", "threshold")
ANOMALOUS, GOOD = "anomalous", "good"


def fetch_detector(config: Mapping[str, str], dest: Path, env: Mapping[str, str] | None = None) -> Detector:
    """Download the model directory named by `config` to `dest` (sha256-verified) and load it.

    config: bank_uri, bank_sha256 and optionally endpoint (else DEFECTOPS_S3_ENDPOINT from `env`).
    Credentials are read from `env` (default: os.environ). Raises ValueError for an incomplete config,
    flows.storage.StorageError (ChecksumError on a mismatch) when the store refuses or the bytes differ.
    """
    missing = [key for key in CONFIG_KEYS[:2] if not config.get(key)]
    if missing:
        raise ValueError(f"model config lacks {missing}: cannot locate the model's bank in the object store")
    env = dict(os.environ if env is None else env)
    bucket, _ = parse_uri(config["bank_uri"])
    env["DEFECTOPS_BUCKET"] = bucket
    if config.get("endpoint"):
        env["DEFECTOPS_S3_ENDPOINT"] = config["endpoint"]
    store = ObjectStore.from_env(env)
    store.get_dir(config["bank_uri"], Path(dest), config["bank_sha256"], overwrite=True)
    logger.info("fetched %s (sha256 %s…) to %s", config["bank_uri"], config["bank_sha256"][:12], dest)
    return load_detector(dest)


class DefectOpsModel(PythonModel):
    """Scores images with a detector fetched from the object store; see the module docstring."""

    def load_context(self, context) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="defectops-model-")
        self.detector = fetch_detector(context.model_config or {}, Path(self._workdir.name) / "model")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """model_input: a DataFrame with an `image_path` column and, for a model trained on several lines
        (a unified model), a `line` column choosing each row's threshold -> one row per image, in order."""
        if not isinstance(model_input, pd.DataFrame) or "image_path" not in model_input.columns:
            raise ValueError("predict expects a pandas DataFrame with an 'image_path' column")
        return predict_frame(self.detector, model_input)


def predict_frame(detector: Detector, frame: pd.DataFrame) -> pd.DataFrame:
    """Score `frame.image_path`; rows are grouped by `frame.line` when present (detector.for_line(line)
    then supplies that line's threshold; an unknown line is a ValueError naming it)."""
    paths = [str(p) for p in frame["image_path"]]
    lines = [None if pd.isna(v) else str(v) for v in frame["line"]] if "line" in frame.columns else [None] * len(paths)
    scores = np.zeros(len(paths), dtype=np.float64)
    decisions: list[str | None] = [None] * len(paths)
    levels = [float("nan")] * len(paths)
    for line in dict.fromkeys(lines):
        rows = [i for i, value in enumerate(lines) if value == line]
        det = detector.for_line(line) if line is not None and hasattr(detector, "for_line") else detector
        line_scores = score_paths(det, [paths[i] for i in rows])
        threshold = getattr(det, "threshold_", None)
        flags = threshold.decide_image(line_scores) if threshold is not None else [None] * len(rows)
        for i, score, flag in zip(rows, line_scores, flags, strict=True):
            scores[i] = float(score)
            if threshold is not None:
                decisions[i], levels[i] = (ANOMALOUS if flag else GOOD), float(threshold.image)
    return pd.DataFrame({"image_path": paths, "score": scores, "decision": decisions, "threshold": levels},
                        columns=list(OUTPUT_COLUMNS))


def score_paths(detector: Detector, paths: list[str]) -> np.ndarray:
    """Image scores (N,) of the image files at `paths`, preprocessed as the detector was trained."""
    if not paths:
        return np.zeros(0, dtype=np.float32)
    data = detector.cfg.data
    samples = [Sample(Path(p), "unknown", 0) for p in paths]
    out = []
    for batch in iter_batches(samples, preprocess_for(data), data.batch_size, max_pixels=data.max_image_pixels):
        out.append(detector.score(batch.images).image_scores)
    return np.concatenate(out)


if __name__ != "flows.pyfunc_model":  # executed by MLflow as the model's code (not a plain import)
    set_model(DefectOpsModel())
