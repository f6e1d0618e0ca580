"""MLflow tracking: the client, experiments and runs, and the credential filter on everything logged.
flows/registry.py holds the model registry (versions, aliases, safe loading); the two and the model code in
flows/pyfunc_model.py are the only modules that import mlflow.

Runs are addressed by id (never the fluent "active run"), so tasks in other threads or processes can log
into the run a flow started:

    configure()                                   # MLFLOW_TRACKING_URI, else sqlite under .defectops/
    run_id = start_run("cookie", "retrain", {"git_commit": sha})
    log_params(run_id, cfg.to_dict()); log_metrics(run_id, result.metrics())
    version = registry.register_version(run_id, "defectops-cookie", bank, endpoint, tags)
    end_run(run_id)                               # or end_run(run_id, "FAILED")

Nothing secret is logged: params and tags are refused (CredentialLeakError) when a key looks like a
credential or a value contains the object store's keys from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from components.config import flatten
from components.evaluation import EvaluationResult
from components.thresholds import Threshold
from infra.process import holder_gone, process_holder

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path(".defectops")
_SECRET_KEY = re.compile(r"(^|[_-])(secret|password|passwd|credentials?)([_-]|$)|(^|[_-])token$"
                         r"|(access|api|secret)[_-]?key", re.I)  # credential-shaped names, not `cnn_token_level`
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DEFECTOPS_S3_ACCESS_KEY",
               "DEFECTOPS_S3_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# MLflow's own defaults retry 7 times with backoff factor 2 (about 4 minutes per call against a stopped
# server, 120 s timeout each): a run would hang for many minutes before failing. Bounded: 3 retries with
# 1, 2, 4 s backoff, 30 s per request (env vars set by the operator win).
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
RUN_HOLDER_TAG = "holder"  # host:pid:start time of the process that runs it (see reap_dead_runs)
_METRIC_KEY = re.compile(r"[^\w.\- /]")
_BATCH = 100
_lock = threading.Lock()
_state: dict[str, Any] = {"uri": None, "client": None, "root": DEFAULT_ROOT}

class RegistryError(LookupError):
    """A run, registered model, version or alias that does not exist; the message names what was asked for."""


class CredentialLeakError(ValueError):
    """A param or tag would have written a credential to MLflow; the message names the key only."""




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


def client() -> MlflowClient:
    if _state["client"] is None:
        configure()
    return _state["client"]


def services_root() -> Path:
    """The services root `configure` was given (where the promotion locks live)."""
    return Path(_state["root"])


def tracking_uri() -> str:
    client()
    return _state["uri"]


# ----------------------------------------------------------------------------------------- runs
def experiment_name(line: str) -> str:
    return f"defectops/{line}"


def _experiment_id(name: str) -> str:
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if _state["uri"].startswith("sqlite:"):
        location = (_state["root"] / "mlartifacts" / name.replace("/", "_")).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another task
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(line: str, run_name: str, tags: Mapping[str, Any] | None = None) -> str:
    """Create a run in experiment `defectops/<line>` (created if missing); return its id."""
    safe = checked(tags or {}, "run tags")
    run = client().create_run(_experiment_id(experiment_name(line)), run_name=run_name,
                              tags={"product_line": line, RUN_HOLDER_TAG: process_holder(), **safe})
    logger.info("MLflow run %s (%s) in %s", run.info.run_id, run_name, experiment_name(line))
    return run.info.run_id


def reap_dead_runs(line: str) -> list[str]:
    """End KILLED the runs of `defectops/<line>` left RUNNING by a process of this host that is gone (killed
    with SIGKILL, machine restarted): their `holder` tag names host, pid and start time. Returns their ids."""
    found = client().get_experiment_by_name(experiment_name(line))
    if found is None:
        return []
    reaped = []
    for run in client().search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=200):
        if holder_gone(run.data.tags.get(RUN_HOLDER_TAG, "")):
            client().set_tag(run.info.run_id, "killed", "its process was gone when a later run started")
            client().set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    if reaped:
        logger.warning("%s: ended %d run(s) KILLED whose process is gone: %s", line, len(reaped), reaped)
    return reaped


def rename_run(run_id: str, name: str) -> None:
    """Give the run a new name (the flows name it by line and version once the version exists)."""
    client().update_run(run_id, name=name)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run: status must be FINISHED, FAILED or KILLED, got {status!r}")
    client().set_terminated(run_id, status)


def get_run(run_id: str) -> dict[str, Any]:
    """{run_id, name, status, experiment, params, metrics, tags, start_time, end_time, artifact_uri}."""
    try:
        run = client().get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"MLflow run {run_id}: not found ({exc.message})") from None
    experiment = client().get_experiment(run.info.experiment_id)
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


def checked(values: Mapping[str, Any], what: str) -> dict[str, str]:
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
    flat = checked(params, "params")
    items = [Param(k, v) for k, v in sorted(flat.items())]
    for i in range(0, len(items), _BATCH):
        client().log_batch(run_id, params=items[i:i + _BATCH])


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numeric metrics (nested dicts flattened); None values are skipped, nan is kept as nan."""
    now = int(time.time() * 1000)
    items = [Metric(_METRIC_KEY.sub("_", k), float(v), now, step or 0)
             for k, v in sorted(flatten(dict(metrics)).items()) if v is not None and not isinstance(v, str)]
    for i in range(0, len(items), _BATCH):
        client().log_batch(run_id, metrics=items[i:i + _BATCH])


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, v) for k, v in checked(tags, "run tags").items()])


def log_artifacts(run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, str(local_dir), artifact_path)


def log_dict(run_id: str, payload: dict, artifact_file: str) -> None:
    """A JSON artifact (e.g. promotion.json) in the run."""
    client().log_dict(run_id, payload, artifact_file)


def log_evaluation(run_id: str, result: EvaluationResult, threshold: Threshold | None, out_dir: Path,
                   worst: int, *, split=None, data=None, fpr_limit: float = 0.3) -> list[Path]:
    """Write ROC/PRO curves, worst-miss overlays, scores.csv and metrics.json to `out_dir`
    (flows.evaluation_artifacts) and log them under the run's `evaluation/`. Metrics themselves are
    logged by log_metrics. split + data (DataConfig) put the test images under the overlays."""
    from flows.evaluation_artifacts import write_evaluation

    written = write_evaluation(result, threshold, out_dir, worst, split=split, data=data, fpr_limit=fpr_limit)
    log_artifacts(run_id, Path(out_dir), "evaluation")
    return written
