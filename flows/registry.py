"""The MLflow model registry: registering a version (the models-from-code pyfunc of flows/pyfunc_model.py, its
bank in the object store), versions and aliases by reference ("@champion" or "3"), and loading a version
safely (nothing unpickled, every sha256 verified). Runs, the client and the credential filter are
flows/tracking.py's.

    version = register_version(run_id, "defectops-cookie", bank, endpoint, tags)
    set_alias("defectops-cookie", "champion", version)
    detector, info = load_version("defectops-cookie", "@champion", dest)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from components.detector import Detector
from flows.tracking import RegistryError, checked, client, tracking_uri
from infra import faults
from infra.storage import StoredObject

logger = logging.getLogger(__name__)

PYFUNC_MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# Logged with the model (MLflow `code_paths`), so it loads and serves where defectops is not installed.
MODEL_CODE_PATHS = (Path(__file__).resolve().parents[1] / "components", Path(__file__).resolve().parent,
                    Path(__file__).resolve().parents[1] / "infra")
MODEL_ARTIFACT = "model"
REQUIRED_VERSION_TAGS = ("git_commit", "git_dirty", "dvc_data_hash", "dvc_remote_path", "params_hash",
                         "weights_sha256", "eval_data_hash", "product_line", "method",
                         "metrics.image_auroc", "metrics.aupro", "metrics.ms_per_image")
# Pinned to this environment's versions (torch==2.13.0, which pip here resolves to the local CPU wheel;
# fastapi and sqlalchemy within constraints.txt's caps), so `mlflow models serve` with the default
# virtualenv manager rebuilds what was tested (docs/serving-mlflow.md).
_PIP_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "faiss-cpu", "safetensors", "numpy", "scipy",
                 "pandas", "pillow", "pydantic", "pyyaml", "boto3", "fastapi", "sqlalchemy")
GATE_LOCK_SUFFIX = ".gate-lock"  # registered models older versions used as gate locks: hidden from listings
_CODE_LOADER = "mlflow.pyfunc.loaders.code_model"

SIGNATURE = ModelSignature(  # flows/pyfunc_model.py: one of image (bytes; base64 in JSON) / image_path per row
    inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "image_path", required=False),
                   ColSpec("string", "line", required=False)]),
    outputs=Schema([ColSpec("string", "image_path", required=False), ColSpec("string", "image_sha256"),
                    ColSpec("double", "score"), ColSpec("double", "normalised_score"),
                    ColSpec("string", "decision", required=False), ColSpec("double", "threshold"),
                    ColSpec("string", "heatmap", required=False)]),
    params=ParamSchema([ParamSpec("heatmap", "boolean", False)]))


class UnsafeModelError(ValueError):
    """A registered model whose loading would unpickle something (not a defectops models-from-code pyfunc)."""


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
    status = client().get_run(run_id).info.status
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        with mlflow.start_run(run_id=run_id):
            yield
    if status != RunStatus.to_string(RunStatus.FINISHED):
        client().update_run(run_id, status=status)


def register_version(run_id: str, model_name: str, bank: StoredObject, endpoint: str,
                     tags: Mapping[str, Any]) -> str:
    """Log the pyfunc model (models from code, flows/pyfunc_model.py, with MODEL_CODE_PATHS and pinned
    pip_requirements) in `run_id` with model_config {bank_uri, bank_sha256}, register it as a new version of
    `model_name`, tag it; return the version. `tags` may nest (`{"metrics": {...}}` ->
    `metrics.image_auroc`); REQUIRED_VERSION_TAGS must be present. bank_uri / bank_sha256 are added from
    `bank`, and `endpoint` (where the bank was stored) as the tag `bank_endpoint`, for lineage only: the
    model reads its endpoint from the loading environment (DEFECTOPS_S3_ENDPOINT), so it is not in the
    model."""
    version_tags = checked({**tags, "bank_uri": bank.uri, "bank_sha256": bank.sha256, "bank_endpoint": endpoint},
                            "version tags")
    missing = [key for key in REQUIRED_VERSION_TAGS if key not in version_tags]
    if missing:
        raise ValueError(f"register_version({model_name}): tags lack {missing} (needed for lineage and the gate)")
    config = {"bank_uri": bank.uri, "bank_sha256": bank.sha256}
    checked(config, "model config")
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
        client().get_registered_model(model_name)
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
            mv = client().get_model_version_by_alias(model_name, value)
        else:
            mv = client().get_model_version(model_name, value)
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
        return str(client().get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def set_alias(model_name: str, alias: str, version: str) -> None:
    if not alias or alias.isdigit():
        raise ValueError(f"alias {alias!r}: use a name, not a number (numbers mean versions)")
    client().set_registered_model_alias(model_name, alias, str(version))


def set_version_tags(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    for key, value in checked(tags, "version tags").items():
        client().set_model_version_tag(model_name, str(version), key, value)


def registered_model_names() -> list[str]:
    """Every registered model of the registry except the gate locks older versions kept there (paginated)."""
    names, token = [], None
    while True:
        page = client().search_registered_models(max_results=200, page_token=token)
        names += [m.name for m in page if not m.name.endswith((GATE_LOCK_SUFFIX, GATE_LOCK_SUFFIX + ".break"))]
        token = page.token
        if not token:
            return sorted(names)


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of `model_name`, oldest first."""
    found = client().search_model_versions(f"name = '{model_name}'")
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
