"""The one interface every method implements, and the registry that builds them from config.

A detector is configured in `__init__` (nothing learned), learns in `fit`, and keeps learned state in
attributes ending in `_`. `score` on an unfitted detector raises `NotFittedError`. `save`/`load` use
safetensors + JSON only, with the sha256 of every file recorded in `manifest.json` and checked on load.
BaseDetector holds the plumbing every method shares; what only some can do (update, feature caching, per-line
views, training in steps) is declared in components.capabilities.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from safetensors.torch import save_file

from components.config import Config, validate

if TYPE_CHECKING:
    from components.backbones import WeightsInfo

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
VERSION = "0.1.0"
"""library_version in every saved model's metadata.json."""


class NotFittedError(RuntimeError):
    """Raised when a detector is used before `fit` (or `load`)."""


class ArtifactError(ValueError):
    """A saved model that is incomplete, tampered with or of an unknown format; names the file."""


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of one batch: higher = more anomalous.

    image_scores: (B,) float32; anomaly_maps: (B, H, W) float32 at the input resolution.
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray

    def __post_init__(self) -> None:
        if self.image_scores.ndim != 1 or self.anomaly_maps.ndim != 3:
            raise ValueError("ScoreBatch needs image_scores (B,) and anomaly_maps (B, H, W)")
        if self.image_scores.shape[0] != self.anomaly_maps.shape[0]:
            raise ValueError("ScoreBatch: image_scores and anomaly_maps disagree on B")

    @staticmethod
    def concat(batches: Iterable[ScoreBatch]) -> ScoreBatch:
        batches = list(batches)
        if not batches:
            return ScoreBatch(np.zeros(0, np.float32), np.zeros((0, 0, 0), np.float32))
        return ScoreBatch(
            np.concatenate([b.image_scores for b in batches]),
            np.concatenate([b.anomaly_maps for b in batches]),
        )


ImageInput = torch.Tensor | Iterable[torch.Tensor]


@runtime_checkable
class Detector(Protocol):
    name: str

    def fit(self, images: ImageInput) -> Detector: ...

    def score(self, images: torch.Tensor) -> ScoreBatch: ...

    def save(self, directory: str | Path) -> Path: ...

    @classmethod
    def load(cls, directory: str | Path) -> Detector: ...


def iter_image_batches(images: ImageInput, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) float batches from one tensor (split into batch_size) or an iterable of tensors."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    for batch in images:
        batch = getattr(batch, "images", batch)  # components.data.Batch or a plain tensor
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        yield batch


ProgressFn = Callable[[str, int, "int | None"], None]
"""progress(stage, done, total): called by fit/score so a CLI or flow can draw bars; components never print."""


D = TypeVar("D", bound="BaseDetector")

RUN_STATS = frozenset({"teacher_reused", "resumed_from_step", "steps_run", "extract_shards"})
"""fit_stats_ keys that describe the run rather than the model (with every `*_s` timing): kept out of the
saved model, so two identical fits write identical, content-addressed model folders (the flows log them to
MLflow instead)."""


def model_stats(stats: dict[str, float]) -> dict[str, float]:
    """The fit statistics a saved model records: `stats` without timings (`*_s`) and RUN_STATS."""
    return {k: v for k, v in stats.items() if not k.endswith("_s") and k not in RUN_STATS}


class BaseDetector:
    """The plumbing every detector shares: configuration (`cfg`, and `params`: the `cfg.detector` section named
    like the registered method), the learned state every method has (`weights_`: lineage of the frozen
    weights, `fit_stats_`, the calibrated `threshold_` and `calibration_`), torch threads, the input check and
    the batch loop of `score`, and the saved model's safetensors + metadata.json around write_model_dir /
    read_saved_model.

    A subclass implements fit, is_fitted, `_score_batch` (one checked batch -> ScoreBatch), `metadata`
    (from `common_metadata`), and save/load through `write_saved_model` / `open_saved_model`."""

    name: str = "base"
    SAVED_BEFORE_DEFAULTS: dict[str, Any] = {}
    """Fields of this method's section added after models were saved, with the value an older saved model
    (which lacks them) was built with: load fills them in before validating, so a changed default never
    reinterprets an older model."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.params: Any = getattr(cfg.detector, self.name, None)
        self.weights_: WeightsInfo | None = None
        self.fit_stats_: dict[str, float] = {}
        self.threshold_ = None  # components.thresholds.Threshold, set after calibration
        self.calibration_ = None  # dict: the calibration's good scores and image statistics (monitoring)

    @classmethod
    def from_config(cls, cfg: Config) -> BaseDetector:
        return cls(cfg)

    @property
    def is_fitted(self) -> bool:
        raise NotImplementedError

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load() first")

    def _set_threads(self) -> None:
        """torch's intra-op threads to `params.threads` (0: torch's default); per call, reset only on change."""
        threads = self.params.threads
        if threads > 0 and torch.get_num_threads() != threads:  # resetting costs ~0.3 ms
            torch.set_num_threads(threads)

    # ---------------------------------------------------------------------------------------- score
    def score(self, images: ImageInput, progress: ProgressFn | None = None) -> ScoreBatch:
        """images (B, 3, H, W) in [0, 1] (a tensor or an iterable of batches) -> ScoreBatch with maps at
        (H, W), batch by batch (`_score_batch`)."""
        self.check_fitted()
        self._set_threads()
        out, done = [], 0
        for batch in iter_image_batches(images, self.cfg.data.batch_size):
            check_input(batch)
            out.append(self._score_batch(batch))
            done += batch.shape[0]
            if progress:
                progress("score", done, None)
        return out[0] if len(out) == 1 else ScoreBatch.concat(out)  # one batch: no copy of its maps

    def _score_batch(self, batch: torch.Tensor) -> ScoreBatch:
        """One checked batch (B, 3, H, W) -> its ScoreBatch (maps at (H, W))."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- save/load
    def common_metadata(self) -> dict:
        """The metadata.json fields every detector writes (subclasses add their own in `metadata`)."""
        return {"method": self.name, "library_version": VERSION, "config": self.cfg.to_dict(),
                "fit_stats": model_stats(self.fit_stats_)}

    def metadata(self) -> dict:
        return self.common_metadata()

    def write_saved_model(self, directory: str | Path, tensors: dict[str, dict[str, torch.Tensor]],
                          extra: dict[str, Callable[[Path], None]] | None = None,
                          metadata: dict | None = None) -> Path:
        """Save: one safetensors file per entry of `tensors` (file name -> state), metadata.json (`metadata`,
        default `self.metadata()`), the threshold if calibrated, and `extra` writers, atomically with a
        manifest."""
        self.check_fitted()
        meta = self.metadata() if metadata is None else metadata
        writers: dict[str, Callable[[Path], None]] = {
            name: (lambda p, state=state: save_file(state, str(p))) for name, state in tensors.items()}
        writers["metadata.json"] = lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True))
        writers.update(self.threshold_writer())
        writers.update(extra or {})
        return write_model_dir(directory, self.name, writers)

    @classmethod
    def open_saved_model(cls: type[D], directory: str | Path,
                         needed: tuple[str, ...]) -> tuple[D, dict[str, Path], dict]:
        """Load's start: the checksum-verified files (`needed` must be there), a detector configured from the
        saved config with its fit_stats_ and threshold set, and the parsed metadata.json."""
        files, meta = read_saved_model(directory, cls.name, needed)
        section = meta.get("config", {}).get("detector", {}).get(cls.name) if isinstance(meta.get("config"), dict) \
            else None
        if isinstance(section, dict):  # fields added later: absent in an older model means the old behaviour
            for key, value in cls.SAVED_BEFORE_DEFAULTS.items():
                section.setdefault(key, value)
        det = cls(validate(meta["config"], source=str(files["metadata.json"])))
        det.fit_stats_ = meta.get("fit_stats", {})
        det.read_threshold(files)
        return det, files, meta

    def threshold_writer(self) -> dict[str, Callable[[Path], None]]:
        if self.threshold_ is None:
            return {}
        payload = json.dumps(self.threshold_.to_dict(), indent=2, sort_keys=True)
        writers = {"threshold.json": lambda path: path.write_text(payload)}
        if getattr(self, "calibration_", None):
            calibration = json.dumps(self.calibration_, sort_keys=True)
            writers["calibration.json"] = lambda path: path.write_text(calibration)
        return writers

    def read_threshold(self, files: dict[str, Path]) -> None:
        from components.thresholds import Threshold

        if "threshold.json" in files:
            self.threshold_ = Threshold.from_dict(json.loads(files["threshold.json"].read_text()))
        if "calibration.json" in files:
            try:
                self.calibration_ = json.loads(files["calibration.json"].read_text())
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{files['calibration.json']}: not valid JSON ({exc})") from None


def check_input(batch: torch.Tensor) -> None:
    """ValueError unless batch is (B, 3, H, W)."""
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(batch.shape)}")


# --------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type] = {}


def register_detector(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"detector {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_detectors() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def detector_class(name: str) -> type:
    _import_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def create_detector(cfg: Config) -> Detector:
    """Build the detector named by `cfg.detector.method`, configured from the whole config."""
    return detector_class(cfg.detector.method).from_config(cfg)


def load_detector(directory: str | Path) -> Detector:
    """Load any saved detector: the manifest names its method; every file's sha256 is checked."""
    manifest = read_manifest(directory)
    return detector_class(manifest["method"]).load(directory)


def _import_builtin() -> None:
    import components.dinomaly.detector  # noqa: F401  (registers itself; the package __init__ stays lazy)
    import components.divide_assemble.detector  # noqa: F401  (registers itself)
    import components.patchcore.detector  # noqa: F401  (registers itself)
    import components.patchcore.ensemble  # noqa: F401  (registers itself)
    import components.students.detector  # noqa: F401  (registers itself)
    import components.transformaly.detector  # noqa: F401  (registers itself)


# --------------------------------------------------------------------------------------- artifacts
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_model_dir(directory: str | Path, method: str, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write a model directory atomically: files go to a temp sibling, get hashed into manifest.json,
    and the temp dir replaces `directory` only when everything is written (nothing half-written).

    An existing `directory` is replaced only when it is empty or a saved model (holds manifest.json): any
    other folder or file is refused with ArtifactError rather than deleted.
    """
    directory = Path(directory)
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)
    try:
        files = {}
        for name, write in writers.items():
            write(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
        manifest = {"format_version": FORMAT_VERSION, "method": method, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            _rmtree(old)  # left over by an interrupted earlier save: os.replace cannot overwrite it
            os.replace(directory, old)
            os.replace(tmp, directory)
            _rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        _rmtree(tmp)
        raise
    return directory


def _check_replaceable(directory: Path) -> None:
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir() or directory.is_symlink():
        raise ArtifactError(f"{directory}: exists and is not a folder; refusing to replace it with a model")
    if any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise ArtifactError(f"{directory}: folder is not empty and holds no saved model ({MANIFEST}); "
                            "refusing to replace it (choose a new or empty folder)")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not a saved defectops model")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: not a defectops manifest (expected an object with 'files')")
    if manifest.get("format_version") != FORMAT_VERSION or "method" not in manifest:
        raise ArtifactError(f"{path}: unknown model format {manifest.get('format_version')!r}")
    return manifest


def verified_files(directory: str | Path, expected_method: str) -> dict[str, Path]:
    """Check every file listed in the manifest against its sha256; return name -> path."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest["method"] != expected_method:
        raise ArtifactError(f"{directory}: holds a {manifest['method']!r} model, not {expected_method!r}")
    out = {}
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 mismatch (expected {entry['sha256'][:12]}…, got {actual[:12]}…)")
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        out[name] = path
    return out


def _check_safetensors(path: Path) -> None:
    """ArtifactError naming the file unless its header parses as safetensors (a file that matches its
    manifest can still be something else, e.g. a pickle planted with a re-hashed manifest)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "not safetensors"
        raise ArtifactError(f"{path}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None


def read_saved_model(directory: str | Path, method: str, needed: tuple[str, ...]) -> tuple[dict[str, Path], dict]:
    """Checksum-verified files of a saved `method` model and its parsed metadata.json.

    ArtifactError names the file when one of `needed` (metadata.json always) is missing."""
    files = verified_files(directory, method)
    for name in (*needed, "metadata.json"):
        if name not in files:
            raise ArtifactError(f"{Path(directory) / name}: missing from the saved model")
    try:
        meta = json.loads(files["metadata.json"].read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{files['metadata.json']}: not valid JSON ({exc})") from None
    return files, meta


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
