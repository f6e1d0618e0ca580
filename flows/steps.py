"""The pipeline's steps: the Prefect tasks and helpers that the flows (flows.retrain, flows.unified,
flows.inference, flows.monitor) are built from. Flows import this module and never each other.

Tasks take the validated `Config` itself (built once per flow run by `line_config` / `unified_config`, with
the line's overrides and then the caller's `--set` overrides applied once, in components.config.load_config)
and pass paths, URIs and digests between them, never tensors. Retries are on network I/O only.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import runtime, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file

from components.capabilities import FeatureCached
from components.config import NAME_PATTERN, Config, ConfigError, load_config
from components.data import scan_line
from components.detector import create_detector, load_detector
from components.evaluation import evaluate_split
from components.report import calibration_line
from components.training import calibrate_detector, fit_and_calibration_samples, fit_options, image_stream
from flows import candidate_check, debris, promote, registry, tracking, versioning
from flows.feature_cache import cached_features_sha256, feature_cache_key, write_cached_features
from infra import faults
from infra.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumError,
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    StoredObject,
)

logger = logging.getLogger(__name__)

MODEL_PREFIX = "models"
TRAIN_LOG_EVERY = 25  # per-step training metrics are sent to MLflow in batches of this many steps


class RetrainError(RuntimeError):
    """A retrain that failed; the message names the product line, the step and the cause."""


def line_config(params_path: str | Path, line: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """params.yaml -> the line's config: its `lines.<line>.overrides`, then the caller's `key=value` overrides
    (load_config applies both, once). ConfigError for an unknown line."""
    return load_config(params_path, overrides, line=line)


def unified_config(params_path: str | Path, lines: list[str] | None,
                   overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, list[str]]:
    """params.yaml (top level, detector.method forced to dinomaly) + `key=value` overrides, and the lines
    to train on (all of params.yaml's when None). ConfigError for an unknown line."""
    cfg = load_config(params_path, [*overrides, "detector.method=dinomaly"])
    chosen = sorted(set(lines)) if lines else sorted(cfg.lines)
    if not chosen:
        raise ConfigError(f"{params_path}: no product lines under `lines:`")
    unknown = [line for line in chosen if line not in cfg.lines]
    if unknown:
        raise ConfigError(f"{params_path}: unknown product line(s) {unknown}; it has {sorted(cfg.lines)}")
    return cfg, chosen


def check_unified_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"unified model name {name!r} must match {NAME_PATTERN.pattern}")


def services_root(cfg: Config) -> Path:
    return cfg.services.root.resolve()


def object_store() -> ObjectStore:
    """The object store named by the environment (DEFECTOPS_S3_ENDPOINT, DEFECTOPS_BUCKET, AWS_*)."""
    return ObjectStore.from_env(connect_timeout=3, max_attempts=2)


def checkpoint_dir(root: Path, name: str, cfg: Config, data_hash: str) -> Path:
    """<services.root>/checkpoints/<model name>/<cfg digest>-<data hash>: stable across task retries and
    flow re-runs of the same config and data, so an interrupted training resumes there."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in data_hash)
    return Path(root) / "checkpoints" / name / f"{cfg.digest()[:16]}-{safe}"


class TrainLog:
    """log_step callback for iterative detectors: buffers per-step metrics and logs them to the run as
    `train.<key>` at their step, `every` steps at a time; call `flush()` after fit for the remainder."""

    def __init__(self, run_id: str, every: int = TRAIN_LOG_EVERY, prefix: str = "train.") -> None:
        self.run_id, self.every, self.prefix = run_id, max(1, every), prefix
        self.buffer: list[tuple[int, dict[str, float]]] = []
        self.steps_logged = 0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.buffer.append((step, {f"{self.prefix}{k}": v for k, v in metrics.items()}))
        if len(self.buffer) >= self.every:
            self.flush()

    def flush(self) -> None:
        buffer, self.buffer = self.buffer, []
        for step, metrics in buffer:
            tracking.log_metrics(self.run_id, metrics, step=step)
        self.steps_logged += len(buffer)


def _fit_and_calibration(cfg: Config, data_path: str):
    split = scan_line(data_path)
    return split, *fit_and_calibration_samples(cfg, split.train)


# ------------------------------------------------------------------------------------------------ tasks

def retry_on_network_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry when the object store was unreachable or answered a server error,
    never for refused credentials, a missing bucket, a checksum mismatch or a user mistake."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(exc, AccessDeniedError | BucketNotFoundError | ObjectNotFoundError | ChecksumError | InvalidKeyError):
        return False
    return isinstance(exc, StorageError | ConnectionError | TimeoutError)


@task(cache_policy=NO_CACHE)
def check_store() -> str:
    """Fail fast with a clear StorageError when the object store is down or refuses the credentials."""
    store = object_store()
    store.exists(f"s3://{store.bucket}/{MODEL_PREFIX}/.probe")
    return store.endpoint_url


@task(cache_policy=NO_CACHE)
def version_data(run_id: str, line: str, source: str, registry: str, max_train_images: int | None,
                 snapshot: str) -> dict:
    """Stage, `dvc add`, commit and `dvc push` the exact data of this run (read by the next steps from a
    private snapshot); its hashes go on the run."""
    data = versioning.version_line(line, Path(source), Path(registry), max_train_images,
                                   snapshot_to=Path(snapshot)).to_dict()
    tracking.set_run_tags(run_id, {"dvc_data_hash": data["dvc_md5"], "dvc_remote_path": data["remote_path"],
                                   "eval_data_hash": data["eval_data_hash"]})
    tracking.log_metrics(run_id, {"data.n_files": data["n_files"], "data.bytes": data["size"]})
    return data


@task(cache_policy=NO_CACHE)
def extract_features(run_id: str, cfg: Config, data_path: str, data_hash: str, cache_dir: str) -> dict:
    """Patch embeddings of the fit images, cached under `<cache_dir>/<key>.safetensors`."""
    detector = create_detector(cfg)
    if not isinstance(detector, FeatureCached):
        return {"path": None, "cache_hit": False}
    split, fit, _ = _fit_and_calibration(cfg, data_path)
    key = feature_cache_key(detector.feature_key(), data_hash, [s.path.relative_to(split.root).as_posix() for s in fit])
    path = Path(cache_dir) / f"{key}.safetensors"
    t0 = time.perf_counter()
    sha = cached_features_sha256(path)
    hit = sha is not None
    faults.reached("extract")
    if not hit:
        sha = write_cached_features(path, detector.extract(image_stream(fit, cfg.data)))
    out = {"path": str(path) if sha else None, "sha256": sha, "key": key, "cache_hit": hit,
           "extract_s": time.perf_counter() - t0}
    tracking.log_metrics(run_id, {"feature_cache_hit": float(hit), "extract_s": out["extract_s"]})
    tracking.set_run_tags(run_id, {"feature_cache_key": key})
    return out


@task(cache_policy=NO_CACHE)
def build_model(run_id: str, cfg: Config, data_path: str, features: dict, model_dir: str,
                checkpoints: str | None = None) -> dict:
    """Fit the detector (from cached features when there are some), calibrate its threshold, save it.
    Iterative detectors log per-step metrics (`train.*`) and checkpoint to `checkpoints` (removed once the
    model is saved) when their `fit` accepts log_step / checkpoint_dir."""
    _, fit, calibration = _fit_and_calibration(cfg, data_path)
    detector = create_detector(cfg)
    t0 = time.perf_counter()
    cached = None
    if features.get("path") and cached_features_sha256(Path(features["path"])) == features.get("sha256"):
        cached = load_file(features["path"])["features"]
        detector.fit_features(cached)
    else:
        train_log = TrainLog(run_id)
        detector.fit(image_stream(fit, cfg.data), **fit_options(detector, train_log, checkpoints))
        train_log.flush()
    fit_s = time.perf_counter() - t0
    calibrate_detector(detector, calibration, cfg, features=cached)  # crossfit: k fold fits from `cached`
    detector.save(model_dir)
    threshold = detector.threshold_
    if threshold is not None:
        tracking.log_metrics(run_id, {"calibration_frr_upper_bound": threshold.frr_upper_bound,
                                      "calibration_guaranteed": float(bool(threshold.guaranteed))})
        tracking.set_run_tags(run_id, {"calibration.method": str(threshold.calibration),
                                       "calibration.guaranteed": str(bool(threshold.guaranteed)).lower()})
        if line := calibration_line(threshold):
            logger.warning("%s", line)
    if checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    tracking.log_metrics(run_id, {"fit_s": fit_s, "n_fit": len(fit), "n_calibration": len(calibration),
                                  "fit": dict(getattr(detector, "fit_stats_", {}))})
    return {"model_dir": model_dir, "weights_sha256": getattr(getattr(detector, "weights_", None), "sha256", "unknown")}


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_network_error)
def upload_model(run_id: str, model_dir: str, line: str) -> dict:
    """Model directory -> models/<line>/<sha256>/... with a manifest; returns the StoredObject as a dict."""
    bank = asdict(object_store().put_dir(Path(model_dir), [MODEL_PREFIX, line]))  # one key part: no "/" or ".."
    tracking.set_run_tags(run_id, {"bank_uri": bank["uri"], "bank_sha256": bank["sha256"]})
    return bank


@task(cache_policy=NO_CACHE)
def evaluate_model(run_id: str, model_dir: str, data_path: str, cfg: Config, out_dir: str) -> dict:
    """Score the pinned test split with the saved model (checksums verified at load); log metrics, curves
    and worst-miss overlays."""
    detector = load_detector(model_dir)
    split = scan_line(data_path)
    result = evaluate_split(detector, split, cfg)
    metrics = result.metrics()
    tracking.log_metrics(run_id, metrics)
    tracking.log_evaluation(run_id, result, detector.threshold_, Path(out_dir), cfg.evaluation.worst_misses,
                            split=split, data=cfg.data, fpr_limit=cfg.evaluation.aupro_fpr_limit)
    return metrics


@task(cache_policy=NO_CACHE)
def check_stored_candidate(run_id: str, bank: dict, model_dir: str, data_path: str, work_dir: str, line: str) -> dict:
    """Before registration and any alias move: fetch the candidate as serving does (every sha256 verified),
    repair corrupt objects from `model_dir`, score a few images (flows.candidate_check)."""
    store = object_store()
    report = candidate_check.check_candidate(bank, model_dir, data_path, Path(work_dir) / "candidate",
                                             [MODEL_PREFIX, line], store)
    tracking.set_run_tags(run_id, {"candidate_check": f"loaded from the store, {report['scored']} images scored",
                                   "candidate_check.repaired": ",".join(report["repaired"]) or "none"})
    return report


@task(cache_policy=NO_CACHE)
def register(run_id: str, name: str, bank: dict, endpoint: str, tags: dict, label: str) -> str:
    """Register the uploaded model as a new version of `name`; the run is renamed `<label>-v<version>`
    (label: `run_label`, what the run was named by at its start)."""
    version = registry.register_version(run_id, name, StoredObject(**bank), endpoint, tags)
    try:
        tracking.rename_run(run_id, f"{label}-v{version}")
    except Exception as exc:  # noqa: BLE001 - a name is a convenience; the version is registered
        logger.warning("could not rename MLflow run %s: %s", run_id, exc)
    return version


@task(cache_policy=NO_CACHE)
def gate(name: str, version: str, metrics: dict, eval_data_hash: str, cfg: Config, data_path: str,
         work_dir: str) -> dict:
    """The promotion gate; the champion is re-evaluated on this run's pinned data only when needed."""

    def reevaluate(champion: dict) -> dict:
        dest = Path(work_dir) / f"champion-v{champion['version']}"
        detector, _ = registry.load_version(name, champion["version"], dest)
        same_eval = detector.cfg.model_copy(update={"evaluation": cfg.evaluation})
        return evaluate_split(detector, scan_line(data_path), same_eval).metrics()

    return promote.apply_gate(name, version, metrics, eval_data_hash, cfg.promotion, reevaluate).to_dict()


# ------------------------------------------------------------------------------------------------ flow

def fail_run(run_id: str, step: str, exc: BaseException, root: Path | None = None) -> None:
    """Record the failure on the run and end it FAILED; never masks the original error. When MLflow cannot
    take the tags (it is what died), they are kept under `root` and applied by the next run (flows.debris)."""
    tags = {"failed_step": step, "error": f"{type(exc).__name__}: {exc}"[:4000]}
    try:
        tracking.set_run_tags(run_id, tags)
    except Exception as tag_exc:  # noqa: BLE001 - the original error matters more
        logger.warning("could not tag MLflow run %s with the failure: %s", run_id, tag_exc)
        if root is not None:
            debris.record_failure(root, run_id, tags)
    try:
        tracking.end_run(run_id, "FAILED")
    except Exception as end_exc:  # noqa: BLE001
        logger.error("could not mark MLflow run %s FAILED: %s", run_id, end_exc)


def version_tags(cfg: Config, info: dict, data: dict, model: dict, metrics: dict, line: str) -> dict[str, Any]:
    keep = ("image_auroc", "aupro", "pixel_auroc", "image_ap", "pixel_ap", "ms_per_image", "false_reject_rate",
            "false_reject_rate_lower", "false_reject_rate_upper", "n_false_rejects", "n_good", "escape_rate",
            "escape_rate_lower", "escape_rate_upper", "n_escapes", "n_defective", "calibration_frr_upper_bound")
    code = {k: info[k] for k in ("git_commit", "git_dirty")}
    return {**code, "flow_run_id": info["flow_run_id"], "dvc_data_hash": data["dvc_md5"], "dvc_remote_path": data["remote_path"],
            "dvc_registry_commit": data["registry_commit"], "eval_data_hash": data["eval_data_hash"],
            "params_hash": cfg.digest(), "weights_sha256": model["weights_sha256"], "product_line": line,
            "method": cfg.detector.method, "backbone": cfg.backbone.name,
            "promotion.decision": "pending",  # until the gate records its decision (with its reasons)
            "metrics": {k: metrics[k] for k in keep if k in metrics}}


def line_params(cfg: Config, line: str) -> dict[str, Any]:
    """Everything that shapes the model, with only the active method's detector section, plus the line."""
    spec = cfg.lines[line]
    raw = cfg.model_dump(mode="json", exclude={"services", "lines"})
    method = raw["detector"]["method"]
    raw["detector"] = {"method": method, method: raw["detector"].get(method, {})}
    return {**raw,
            "line": {"name": line, "data": str(spec.data), "max_train_images": spec.max_train_images,
                     "cron": spec.cron}}


def run_label(kind: str, line: str) -> str:
    """What a flow's MLflow run is named by: `<kind>-<line>`, then a UTC stamp, then `-v<version>`."""
    return f"{kind}-{line}"


def start_flow_run(line: str, cfg: Config, kind: str = "retrain") -> tuple[str, dict[str, str]]:
    """The MLflow run of this flow run (experiment defectops/<line>), tagged with the code version and
    `kind`; -> (run_id, tags shared with results)."""
    commit = versioning.git_commit()
    info = {"git_commit": commit,
            "git_dirty": versioning.git_dirty() if commit != versioning.NO_COMMIT else "unknown",
            "flow_run_id": str(runtime.flow_run.id or "none"), "flow_run_name": str(runtime.flow_run.name or "")}
    try:
        debris.after_crashes(line, services_root(cfg))
    except Exception as exc:  # noqa: BLE001 - housekeeping must not stop a run; start_run reports MLflow errors
        logger.warning("could not check %s for runs left RUNNING by dead processes: %s", line, exc)
    try:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        run_id = tracking.start_run(line, f"{run_label(kind, line)}-{stamp}",  # -v<version> once registered
                                    {**info, "params_hash": cfg.digest(), "kind": kind})
    except Exception as exc:
        raise RetrainError(f"{kind} {line}: cannot start an MLflow run at {tracking.tracking_uri()}: "
                           f"{type(exc).__name__}: {exc}") from exc
    return run_id, info


# ------------------------------------------------------------------------------------------------ serving

def check_serves(champion: dict, line: str) -> None:
    """RegistryError unless the fetched unified champion was trained on `line` (its `lines` tag)."""
    trained_on = json.loads(champion["tags"].get("lines") or "[]")
    if line not in trained_on:
        raise tracking.RegistryError(
            f"{champion['name']}@champion (version {champion['version']}) was not trained on line {line!r} "
            f"(it serves {trained_on or 'no lines'}): retrain it with that line (`defectops retrain-unified "
            f"... --line {line}`) or remove lines.{line}.serve_from")
