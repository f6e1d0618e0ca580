"""MLflow tracking and model registry: the only flows module that imports mlflow (with the model code in
flows/pyfunc_model.py).

Runs are addressed by id (never the fluent "active run"), so tasks in other threads or processes can log
into the run a flow started:

    configure()                                   # MLFLOW_TRACKING_URI, else sqlite under .defectops/
    run_id = start_run("cookie", "retrain", {"git_commit": sha})
    log_params(run_id, cfg.to_dict()); log_metrics(run_id, result.metrics())
    version = register_version(run_id, "defectops-cookie", bank, endpoint, tags)
    end_run(run_id)                               # or end_run(run_id, "FAILED")

Nothing secret is logged: params and tags are refused (CredentialLeakError) when a key looks like a
credential or a value contains the object store's keys from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from components.config import flatten
from components.detector import Detector
from components.evaluation import EvaluationResult
from components.thresholds import Threshold
from flows import faults
from flows.storage import StoredObject

logger = logging.getLogger(__name__)

PYFUNC_MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# Logged with the model (MLflow `code_paths`), so it loads and serves where defectops is not installed.
MODEL_CODE_PATHS = (Path(__file__).resolve().parents[1] / "components", Path(__file__).resolve().parent)
MODEL_ARTIFACT = "model"
DEFAULT_ROOT = Path(".defectops")
REQUIRED_VERSION_TAGS = ("git_commit", "git_dirty", "dvc_data_hash", "dvc_remote_path", "params_hash",
                         "weights_sha256", "eval_data_hash", "product_line", "method",
                         "metrics.image_auroc", "metrics.aupro", "metrics.ms_per_image")
# Pinned to this environment's versions (torch==2.13.0, which pip here resolves to the local CPU wheel;
# fastapi and sqlalchemy within constraints.txt's caps), so `mlflow models serve` with the default
# virtualenv manager rebuilds what was tested (docs/serving-mlflow.md).
_PIP_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "faiss-cpu", "safetensors", "numpy", "scipy",
                 "pandas", "pillow", "pydantic", "pyyaml", "boto3", "fastapi", "sqlalchemy")
_SECRET_KEY = re.compile(r"(^|[_-])(secret|password|passwd|credentials?)([_-]|$)|(^|[_-])token$"
                         r"|(access|api|secret)[_-]?key", re.I)  # credential-shaped names, not `cnn_token_level`
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DEFECTOPS_S3_ACCESS_KEY",
               "DEFECTOPS_S3_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# MLflow's own defaults retry 7 times with backoff factor 2 (about 4 minutes per call against a stopped
# server, 120 s timeout each): a run would hang for many minutes before failing. Bounded: 3 retries with
# 1, 2, 4 s backoff, 30 s per request (env vars set by the operator win).
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
GATE_LOCK_SUFFIX = ".gate-lock"
RUN_HOLDER_TAG = "holder"  # host:pid:start time of the process that runs it (see reap_dead_runs)
_METRIC_KEY = re.compile(r"[^\w.\- /]")
_BATCH = 100
_CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
_lock = threading.Lock()
_state: dict[str, Any] = {"uri": None, "client": None, "root": DEFAULT_ROOT}

SIGNATURE = ModelSignature(  # flows/pyfunc_model.py: one of image (bytes; base64 in JSON) / image_path per row
    inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "image_path", required=False),
                   ColSpec("string", "line", required=False)]),
    outputs=Schema([ColSpec("string", "image_path", required=False), ColSpec("string", "image_sha256"),
                    ColSpec("double", "score"), ColSpec("double", "normalised_score"),
                    ColSpec("string", "decision", required=False), ColSpec("double", "threshold"),
                    ColSpec("string", "heatmap", required=False)]),
    params=ParamSchema([ParamSpec("heatmap", "boolean", False)]))


class CredentialLeakError(ValueError):
    """A param or tag would have written a credential to MLflow; the message names the key only."""


class RegistryError(LookupError):
    """A registered model, version or alias that does not exist; the message names the model and ref."""


class UnsafeModelError(ValueError):
    """A registered model whose loading would unpickle something (not a defectops models-from-code pyfunc)."""


# ----------------------------------------------------------------------------------------- setup
def configure(tracking_uri: str | None = None, root: Path = DEFAULT_ROOT) -> str:
    """Point tracking and registry at `tracking_uri`, else MLFLOW_TRACKING_URI, else sqlite:///ROOT/mlflow.db
    (artifacts under ROOT/mlartifacts). Returns the URI in use. HTTP calls to a tracking server get the
    bounded retries and timeout of HTTP_BOUNDS unless the environment sets its own."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    root = Path(root).resolve()
    if not uri:
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
    with _lock:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        _state.update(uri=uri, client=MlflowClient(tracking_uri=uri, registry_uri=uri), root=root)
    logger.info("MLflow tracking at %s", uri)
    return uri


def _client() -> MlflowClient:
    if _state["client"] is None:
        configure()
    return _state["client"]


def tracking_uri() -> str:
    _client()
    return _state["uri"]


# ----------------------------------------------------------------------------------------- runs
def experiment_name(line: str) -> str:
    return f"defectops/{line}"


def _experiment_id(name: str) -> str:
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if _state["uri"].startswith("sqlite:"):
        location = (_state["root"] / "mlartifacts" / name.replace("/", "_")).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another task
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(line: str, run_name: str, tags: Mapping[str, Any] | None = None) -> str:
    """Create a run in experiment `defectops/<line>` (created if missing); return its id."""
    checked = _checked(tags or {}, "run tags")
    run = _client().create_run(_experiment_id(experiment_name(line)), run_name=run_name,
                               tags={"product_line": line, RUN_HOLDER_TAG: lock_holder(), **checked})
    logger.info("MLflow run %s (%s) in %s", run.info.run_id, run_name, experiment_name(line))
    return run.info.run_id


def reap_dead_runs(line: str) -> list[str]:
    """End KILLED the runs of `defectops/<line>` left RUNNING by a process of this host that is gone (killed
    with SIGKILL, machine restarted): their `holder` tag names host, pid and start time. Returns their ids."""
    found = _client().get_experiment_by_name(experiment_name(line))
    if found is None:
        return []
    reaped = []
    for run in _client().search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=200):
        if _holder_gone(run.data.tags.get(RUN_HOLDER_TAG, "")):
            _client().set_tag(run.info.run_id, "killed", "its process was gone when a later run started")
            _client().set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    if reaped:
        logger.warning("%s: ended %d run(s) KILLED whose process is gone: %s", line, len(reaped), reaped)
    return reaped


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run: status must be FINISHED, FAILED or KILLED, got {status!r}")
    _client().set_terminated(run_id, status)


def get_run(run_id: str) -> dict[str, Any]:
    """{run_id, name, status, experiment, params, metrics, tags, start_time, end_time, artifact_uri}."""
    try:
        run = _client().get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"MLflow run {run_id}: not found ({exc.message})") from None
    experiment = _client().get_experiment(run.info.experiment_id)
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "experiment": experiment.name if experiment else run.info.experiment_id,
            "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            "start_time": run.info.start_time, "end_time": run.info.end_time,
            "artifact_uri": run.info.artifact_uri}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return json.dumps(value, sort_keys=True, default=str)


def _secrets_in_env() -> list[str]:
    return [v for name in _SECRET_ENV if len(v := os.environ.get(name, "")) >= 4]


def _checked(values: Mapping[str, Any], what: str) -> dict[str, str]:
    """Flatten nested dicts to dotted keys, stringify, and refuse anything that looks like a credential."""
    flat = {str(k): _text(v) for k, v in flatten(dict(values)).items()}
    secrets = _secrets_in_env()
    for key, value in flat.items():
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            raise CredentialLeakError(f"{what}: refusing to log {key!r}: the name looks like a credential")
        if any(secret in value for secret in secrets):
            raise CredentialLeakError(f"{what}: refusing to log {key!r}: its value contains a credential "
                                      "from the environment")
    return flat


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log params flattened to dotted keys (`detector.patchcore.coreset_ratio`); values as text."""
    flat = _checked(params, "params")
    items = [Param(k, v) for k, v in sorted(flat.items())]
    for i in range(0, len(items), _BATCH):
        _client().log_batch(run_id, params=items[i:i + _BATCH])


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numeric metrics (nested dicts flattened); None values are skipped, nan is kept as nan."""
    now = int(time.time() * 1000)
    items = [Metric(_METRIC_KEY.sub("_", k), float(v), now, step or 0)
             for k, v in sorted(flatten(dict(metrics)).items()) if v is not None and not isinstance(v, str)]
    for i in range(0, len(items), _BATCH):
        _client().log_batch(run_id, metrics=items[i:i + _BATCH])


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    _client().log_batch(run_id, tags=[RunTag(k, v) for k, v in _checked(tags, "run tags").items()])


def log_artifacts(run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
    _client().log_artifacts(run_id, str(local_dir), artifact_path)


def log_dict(run_id: str, payload: dict, artifact_file: str) -> None:
    """A JSON artifact (e.g. promotion.json) in the run."""
    _client().log_dict(run_id, payload, artifact_file)


def log_evaluation(run_id: str, result: EvaluationResult, threshold: Threshold | None, out_dir: Path,
                   worst: int, *, split=None, data=None, fpr_limit: float = 0.3) -> list[Path]:
    """Write ROC/PRO curves, worst-miss overlays, scores.csv and metrics.json to `out_dir`
    (flows.evaluation_artifacts) and log them under the run's `evaluation/`. Metrics themselves are
    logged by log_metrics. split + data (DataConfig) put the test images under the overlays."""
    from flows.evaluation_artifacts import write_evaluation

    written = write_evaluation(result, threshold, out_dir, worst, split=split, data=data, fpr_limit=fpr_limit)
    log_artifacts(run_id, Path(out_dir), "evaluation")
    return written


# ----------------------------------------------------------------------------------------- registry
def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model, read from this environment (no dependency inference)."""
    out = []
    for name in _PIP_PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:  # never an unpinned requirement (torch would pull CUDA)
            raise RuntimeError(f"cannot pin the model's requirement {name!r}: it is not installed here") from None
    return out


@contextmanager
def _resumed(run_id: str):
    """Make `run_id` the fluent active run in this thread (mlflow.pyfunc.log_model logs into it), then put
    its status back: leaving mlflow.start_run marks a run FINISHED."""
    status = _client().get_run(run_id).info.status
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        with mlflow.start_run(run_id=run_id):
            yield
    if status != RunStatus.to_string(RunStatus.FINISHED):
        _client().update_run(run_id, status=status)


def register_version(run_id: str, model_name: str, bank: StoredObject, endpoint: str,
                     tags: Mapping[str, Any]) -> str:
    """Log the pyfunc model (models from code, flows/pyfunc_model.py, with MODEL_CODE_PATHS and pinned
    pip_requirements) in `run_id` with model_config {bank_uri, bank_sha256}, register it as a new version of
    `model_name`, tag it; return the version. `tags` may nest (`{"metrics": {...}}` ->
    `metrics.image_auroc`); REQUIRED_VERSION_TAGS must be present. bank_uri / bank_sha256 are added from
    `bank`, and `endpoint` (where the bank was stored) as the tag `bank_endpoint`, for lineage only: the
    model reads its endpoint from the loading environment (DEFECTOPS_S3_ENDPOINT), so it is not in the
    model."""
    version_tags = _checked({**tags, "bank_uri": bank.uri, "bank_sha256": bank.sha256, "bank_endpoint": endpoint},
                            "version tags")
    missing = [key for key in REQUIRED_VERSION_TAGS if key not in version_tags]
    if missing:
        raise ValueError(f"register_version({model_name}): tags lack {missing} (needed for lineage and the gate)")
    config = {"bank_uri": bank.uri, "bank_sha256": bank.sha256}
    _checked(config, "model config")
    with _resumed(run_id):
        info = mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, python_model=str(PYFUNC_MODEL_CODE),
                                       model_config=config, pip_requirements=pip_requirements(),
                                       code_paths=[str(p) for p in MODEL_CODE_PATHS], signature=SIGNATURE)
    faults.reached("register")
    mv = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
    logger.info("registered %s version %s (bank %s)", model_name, mv.version, bank.uri)
    return str(mv.version)


def _model_exists(model_name: str) -> bool:
    try:
        _client().get_registered_model(model_name)
        return True
    except MlflowException:
        return False


def _describe(mv) -> dict[str, Any]:
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "aliases": list(mv.aliases),
            "tags": dict(mv.tags), "source": mv.source, "status": mv.status,
            "creation_time": mv.creation_timestamp}


def parse_ref(ref: str) -> tuple[str, str]:
    """"@champion" -> ("alias", "champion"); "3" -> ("version", "3")."""
    ref = str(ref).strip()
    if ref.startswith("@") and len(ref) > 1 and not ref[1:].isdigit():
        return "alias", ref[1:]
    if ref.lstrip("@").isdigit():
        return "version", ref.lstrip("@")
    raise RegistryError(f"{ref!r}: a model reference is '@ALIAS' or a version number")


def get_version(model_name: str, ref: str) -> dict[str, Any]:
    """Version info {name, version, run_id, aliases, tags, source, status, creation_time} for ref
    "@alias" or "3"; RegistryError naming the model and ref when it does not exist."""
    kind, value = parse_ref(ref)
    try:
        if kind == "alias":
            mv = _client().get_model_version_by_alias(model_name, value)
        else:
            mv = _client().get_model_version(model_name, value)
    except MlflowException as exc:
        exists = _model_exists(model_name)
        what = (f"no alias @{value}" if kind == "alias" else f"no version {value}") if exists else \
            "no such registered model"
        raise RegistryError(f"{model_name} {ref}: {what} in the registry at {tracking_uri()} "
                            f"({exc.error_code})") from None
    return _describe(mv)


def version_for_alias(model_name: str, alias: str) -> str | None:
    """The version holding `@alias`, or None (no alias, or no such model)."""
    try:
        return str(_client().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def set_alias(model_name: str, alias: str, version: str) -> None:
    if not alias or alias.isdigit():
        raise ValueError(f"alias {alias!r}: use a name, not a number (numbers mean versions)")
    _client().set_registered_model_alias(model_name, alias, str(version))


def set_version_tags(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    for key, value in _checked(tags, "version tags").items():
        _client().set_model_version_tag(model_name, str(version), key, value)


# ----------------------------------------------------------------------------------------- gate lock
def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def lock_holder() -> str:
    """host:pid:start-time of this process (the start time tells a recycled pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid()) or '?'}"


def _holder_gone(holder: str) -> bool:
    """True when `holder` is a process on this host that no longer runs (killed, even with SIGKILL)."""
    host, _, rest = holder.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or start == "?":
        return False
    return _process_start(int(pid)) != start


def acquire_gate_lock(model_name: str, timeout_s: float = 900.0, stale_s: float = 3600.0,
                      poll_s: float = 0.5) -> str:
    """Take the promotion lock of `model_name`: the registered model `<name>.gate-lock`, whose creation the
    registry allows once (a second create fails RESOURCE_ALREADY_EXISTS), so concurrent gates of one model
    run one at a time wherever they run. A lock whose holder died on this host, or older than `stale_s`,
    is broken. Returns the holder id for `release_gate_lock`; RegistryError after `timeout_s`."""
    lock, holder = model_name + GATE_LOCK_SUFFIX, lock_holder()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _client().create_registered_model(lock, tags={"defectops.lock.holder": holder,
                                                          "defectops.lock.since": f"{time.time():.3f}"},
                                              description=f"promotion gate lock of {model_name}")
            return holder
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            tags = dict(_client().get_registered_model(lock).tags)
        except MlflowException:
            continue  # released meanwhile
        other, since_text = tags.get("defectops.lock.holder", ""), tags.get("defectops.lock.since", "0")
        since = float(since_text or 0)
        if _holder_gone(other) or time.time() - since > stale_s:
            logger.warning("%s: breaking a stale promotion lock held by %s", model_name, other)
            break_stale_lock(lock, other, since_text)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"{model_name}: promotion lock {lock} still held by {other} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def release_gate_lock(model_name: str, holder: str) -> None:
    """Drop the promotion lock if `holder` still holds it."""
    lock = model_name + GATE_LOCK_SUFFIX
    try:
        if _client().get_registered_model(lock).tags.get("defectops.lock.holder") == holder:
            _delete_lock(lock)
    except MlflowException:
        pass


BREAKER_STALE_S = 60.0


def break_stale_lock(lock: str, holder: str, since: str) -> bool:
    """Compare-and-delete: delete `lock` only if it is still the one seen (same holder and `since` tags).
    Breakers take turns through the registered model `<lock>.break` (created once), so a waiter that read
    the stale lock cannot delete the fresh lock another waiter took meanwhile. A `.break` left by a process
    that died inside this short section is removed after BREAKER_STALE_S. -> True if `lock` was deleted."""
    breaker = lock + ".break"
    try:
        _client().create_registered_model(breaker, tags={"defectops.lock.since": f"{time.time():.3f}"})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        try:
            started = float(_client().get_registered_model(breaker).tags.get("defectops.lock.since", "0") or 0)
        except MlflowException:
            return False
        if time.time() - started > BREAKER_STALE_S:
            _delete_lock(breaker)
        return False
    try:
        tags = dict(_client().get_registered_model(lock).tags)
        if tags.get("defectops.lock.holder") != holder or tags.get("defectops.lock.since") != since:
            return False
        _delete_lock(lock)
        return True
    except MlflowException:
        return False
    finally:
        _delete_lock(breaker)


def _delete_lock(lock: str) -> None:
    try:
        _client().delete_registered_model(lock)
    except MlflowException:
        pass


def registered_model_names() -> list[str]:
    """Every registered model of the registry except the gate locks (paginated)."""
    names, token = [], None
    while True:
        page = _client().search_registered_models(max_results=200, page_token=token)
        names += [m.name for m in page if not m.name.endswith((GATE_LOCK_SUFFIX, GATE_LOCK_SUFFIX + ".break"))]
        token = page.token
        if not token:
            return sorted(names)


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of `model_name`, oldest first."""
    found = _client().search_model_versions(f"name = '{model_name}'")
    return sorted((_describe(mv) for mv in found), key=lambda v: int(v["version"]))


def model_uri(model_name: str, ref: str) -> str:
    """models:/NAME@alias or models:/NAME/3, for mlflow.pyfunc.load_model."""
    kind, value = parse_ref(ref)
    return f"models:/{model_name}@{value}" if kind == "alias" else f"models:/{model_name}/{value}"


def check_no_pickle(mlmodel: Mapping[str, Any], where: str) -> None:
    """UnsafeModelError unless an MLmodel describes a models-from-code pyfunc and nothing else: any other
    flavor, or a `python_model` (cloudpickle) entry, would be unpickled by mlflow.pyfunc.load_model."""
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, Mapping) else None
    pyfunc = (flavors or {}).get("python_function") or {}
    if (set(flavors or {}) != {"python_function"} or pyfunc.get("loader_module") != _CODE_LOADER
            or not pyfunc.get("model_code_path") or "python_model" in pyfunc):
        found = {name: (f.get("loader_module"), f.get("python_model")) for name, f in (flavors or {}).items()
                 if isinstance(f, Mapping)}
        raise UnsafeModelError(f"{where}: refusing to load: not a models-from-code pyfunc (flavors {found}); "
                               "loading it would unpickle code from the registry")


def load_pyfunc(model_name: str, ref: str):
    """The registered pyfunc (fetches and verifies its bank in load_context). Its MLmodel is read first
    (YAML only) and anything that would be unpickled is refused with UnsafeModelError."""
    uri = model_uri(model_name, ref)
    check_no_pickle({"flavors": mlflow.models.get_model_info(uri).flavors}, uri)
    return mlflow.pyfunc.load_model(uri)


def load_version(model_name: str, ref: str, dest: Path) -> tuple[Detector, dict[str, Any]]:
    """Fetch the version's model directory to `dest` from the object store (sha256 verified, endpoint and
    credentials from the environment) and load it; returns (detector, version info)."""
    from flows.pyfunc_model import fetch_detector

    info = get_version(model_name, ref)
    tags = info["tags"]
    if not tags.get("bank_uri") or not tags.get("bank_sha256"):
        raise RegistryError(f"{model_name} {ref}: version {info['version']} has no bank_uri/bank_sha256 tags")
    return fetch_detector({"bank_uri": tags["bank_uri"], "bank_sha256": tags["bank_sha256"]}, dest), info


def load_champion(model_name: str, dest: Path) -> tuple[Detector, dict[str, Any]]:
    return load_version(model_name, "@champion", dest)
