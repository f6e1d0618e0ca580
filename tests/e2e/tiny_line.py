"""A tiny product line and a tiny fitted PatchCore for the tracking / promotion / lineage e2e tests.

The line is written in MVTec layout from crops of scikit-image's bundled brick texture (no download),
with bright square defects and their masks; the model uses a randomly initialised backbone at 64x64, so
fitting and evaluating take a few seconds. Also: start SeaweedFS + MLflow from the e2e conftest's shared
root and point flows.tracking at them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from components.config import Config, load_config
from components.evaluation import EvaluationResult, evaluate_split
from components.training import FitResult, fit_line
from flows import tracking
from infra.services import ServiceState, env_for_clients
from infra.storage import ObjectStore, StoredObject

SIZE = 64
OVERRIDES = [
    f"data.image_size=[{SIZE}, {SIZE}]", "data.batch_size=8", "data.calibration_fraction=0.25",
    "backbone.name=mobilenetv2_050", "backbone.layers=[1, 2]", "backbone.weights=random",
    "detector.patchcore.pretrain_embed_dim=32", "detector.patchcore.target_embed_dim=32",
    "detector.patchcore.coreset_ratio=0.25", "detector.patchcore.projection_dim=16",
    "detector.patchcore.num_neighbors=3",
    "detector.patchcore.smoothing_sigma=1.0", "evaluation.worst_misses=3",
]


def _crop(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = rng.integers(0, texture.shape[0] - SIZE), rng.integers(0, texture.shape[1] - SIZE)
    return np.repeat(texture[y:y + SIZE, x:x + SIZE, None], 3, axis=2)


def make_line(root: Path, n_train: int = 8, n_good: int = 3, n_defect: int = 3, seed: int = 0) -> Path:
    """root/train/good, root/test/{good,spot}, root/ground_truth/spot/<stem>_mask.png."""
    rng = np.random.default_rng(seed)
    texture = skdata.brick()
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_crop(texture, rng)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(_crop(texture, rng)).save(root / "test/good" / f"{i:03d}.png")
    for i in range(n_defect):
        image, mask = _crop(texture, rng), np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(4, SIZE - 20, size=2)
        image[y:y + 14, x:x + 14] = 255
        mask[y:y + 14, x:x + 14] = 255
        Image.fromarray(image).save(root / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


def tiny_config(extra: list[str] | None = None) -> Config:
    return load_config(None, [*OVERRIDES, *(extra or [])])


@dataclass
class Tiny:
    cfg: Config
    root: Path
    fit: FitResult
    result: EvaluationResult
    model_dir: Path


def build_tiny(workdir: Path, extra: list[str] | None = None) -> Tiny:
    """Write the line, fit, evaluate on its test split, save the model directory."""
    cfg = tiny_config(extra)
    root = make_line(workdir / "line")
    fit = fit_line(cfg, root)
    result = evaluate_split(fit.detector, fit.split, cfg)
    model_dir = fit.detector.save(workdir / "model")
    return Tiny(cfg, root, fit, result, model_dir)


def unique_name(stem: str = "defectops-t") -> str:
    return f"{stem}{uuid.uuid4().hex[:10]}"


def upload(store: ObjectStore, model_dir: Path) -> StoredObject:
    """put_dir under a prefix of its own, so tampering in one test cannot touch another test's objects."""
    return store.put_dir(model_dir, f"models/{unique_name('t')}")


def connect(state: ServiceState, monkeypatch) -> ObjectStore:
    """Client environment for `state` (monkeypatch.setenv) and flows.tracking pointed at its MLflow."""
    for name, value in env_for_clients(state).items():
        monkeypatch.setenv(name, value)
    tracking.configure(state.mlflow_uri, root=state.root)
    return ObjectStore(state.s3_endpoint, state.bucket, state.access_key, state.secret_key)


def version_tags(tiny: Tiny, metrics: dict | None = None, eval_data_hash: str = "e" * 64) -> dict:
    """Every tag register_version requires; lineage values are recognisable placeholders supplied by the
    test (the flows compute the real ones), metrics default to the tiny model's real evaluation."""
    det = tiny.fit.detector
    return {"git_commit": "c0ffee" * 6 + "beef", "git_dirty": False, "dvc_data_hash": "d" * 32,
            "dvc_remote_path": "s3://defectops-test/dvc/files/md5/dd/" + "d" * 30,
            "params_hash": tiny.cfg.digest(), "weights_sha256": det.weights_.sha256,
            "eval_data_hash": eval_data_hash, "product_line": "tiny", "method": det.name,
            "metrics": metrics if metrics is not None else tiny.result.metrics()}
