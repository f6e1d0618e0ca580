"""Typed, frozen configuration loaded once from params.yaml.

Every section of params.yaml is a model here; unknown keys, wrong types and out-of-range values are
rejected at load with the key's dotted path. `--set a.b=value` overrides are applied before validation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.dinomaly.config import DinomalyConfig
from components.divide_assemble.config import DivideAssembleConfig
from components.patchcore.config import PatchCoreConfig
from components.patchcore.ensemble_config import PatchCoreEnsembleConfig
from components.students.config import StudentsConfig
from components.transformaly.config import TransformalyConfig
from components.type_aliases import Fraction, PositiveInt

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the file and the key path."""


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(Section):
    image_size: tuple[PositiveInt, PositiveInt] = (256, 256)
    # resize: squash to image_size | shorter: shorter side to image_size[0], crop to image_size | aspect:
    # shorter side to min(image_size), aspect kept, no implicit crop | none: native size (crop_size applies)
    resize: Literal["resize", "shorter", "aspect", "none"] = "resize"
    crop_size: tuple[PositiveInt, PositiveInt] | None = None
    max_image_pixels: PositiveInt = 25_000_000  # ~75 MB decoded (RGB); raise it in params.yaml
    batch_size: PositiveInt = 16
    calibration_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    seed: int = 0


class BackboneConfig(Section):
    name: str = "mobilenetv2_100"
    layers: Annotated[tuple[Annotated[int, Field(ge=0)], ...], Field(min_length=1)] = (2, 3)  # error at backbone.layers
    weights: Literal["auto", "packaged", "file", "hub", "random"] = "auto"
    weights_file: Path | None = None
    allow_network: bool = False
    inference_graph: bool = True  # PatchCore: frozen, BN-folded traced graph without autograd (~3x on CPU)

    @model_validator(mode="after")
    def _file_needs_path(self) -> BackboneConfig:
        if self.weights == "file" and self.weights_file is None:
            raise ValueError("weights: 'file' needs weights_file")
        if len(self.layers) == 0:
            raise ValueError("layers must name at least one feature level")
        return self


class DetectorConfig(Section):
    method: str = "patchcore"
    patchcore: PatchCoreConfig = PatchCoreConfig()
    patchcore_ensemble: PatchCoreEnsembleConfig = PatchCoreEnsembleConfig()
    dinomaly: DinomalyConfig = DinomalyConfig()
    divide_assemble: DivideAssembleConfig = DivideAssembleConfig()
    students: StudentsConfig = StudentsConfig()
    transformaly: TransformalyConfig = TransformalyConfig()


class ThresholdConfig(Section):
    false_reject_rate: Annotated[float, Field(gt=0.0, le=0.5)] = 0.01
    # crossfit: every good train image is scored by a model fitted on the other folds, the deployed model
    # on all of them | holdout: data.calibration_fraction held out (docs/operating-point.md)
    calibration: Literal["crossfit", "holdout"] = "crossfit"
    folds: Annotated[int, Field(ge=2)] = 5
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95  # of the FRR upper bound the threshold honours


class EvaluationConfig(Section):
    aupro_fpr_limit: Fraction = 0.3
    worst_misses: Annotated[int, Field(ge=0)] = 6


class PromotionConfig(Section):
    image_auroc_tolerance: Annotated[float, Field(ge=0.0, le=1.0)] = 0.005
    aupro_tolerance: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    latency_budget_ms: Annotated[float, Field(gt=0.0)] = 500.0
    min_image_auroc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    min_aupro: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # the operating point on the pinned test data (flows/promote.py operating_point_checks): refuse a
    # candidate whose false-reject rate on good images / escape rate on defective ones is above (None: not gated)
    max_false_reject_rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.1
    max_escape_rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.5


class MonitoringConfig(Section):
    """`defectops monitor LINE` and its cron deployment (flows/monitor.py, docs/monitoring.md)."""

    cron: str | None = "*/15 * * * *"  # `defectops serve`: one monitor deployment per line (null: none)
    window: PositiveInt = 50  # the latest decisions compared with the calibration distribution
    min_window: PositiveInt = 20  # fewer decisions in the window: not checked
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.01  # false-alarm level of one check (Bonferroni)
    psi_max: Annotated[float, Field(gt=0.0)] | None = None  # score PSI above: drift (null: reported only)
    persist: PositiveInt = 2  # consecutive drifting checks that start the line's retrain
    retrain: bool = True  # start the retrain deployment (with reviewed false alarms) when drift persists


class ExportConfig(Section):
    """`defectops export` and the retrain flow's parity gate (components/export.py, docs/export.md)."""

    enabled: bool = True  # retrain: export the candidate, check parity, register the export when it passes
    formats: tuple[Literal["onnx", "openvino"], ...] = ("onnx", "openvino")  # openvino: skipped if missing
    score_rtol: Annotated[float, Field(ge=0.0)] = 1e-4  # every image score within this relative difference
    min_decision_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # fraction of equal decisions
    map_rtol: Annotated[float, Field(ge=0.0)] | None = 1e-3  # max map difference / map peak; null: not gated
    search_block: PositiveInt = 2048  # bank entries per block of the exported exact nearest-bank search


class ServicesConfig(Section):
    root: Path = Path(".defectops")
    host: Literal["127.0.0.1"] = "127.0.0.1"
    s3_port: Annotated[int, Field(gt=0, lt=65536)] = 8333
    mlflow_port: Annotated[int, Field(gt=0, lt=65536)] = 5000
    prefect_port: Annotated[int, Field(gt=0, lt=65536)] = 4200
    bucket: str = "defectops"
    start_timeout_s: Annotated[float, Field(gt=0)] = 90.0
    schedules: bool = False  # `defectops up` also starts the cron deployments' runner (`serve --detach`)
    # MLflow's backend store and Prefect's database: SQLite files under root, or a local PostgreSQL cluster
    # under root/postgres (Debian's postgresql binaries; docs/reliability.md "Load" compares the two)
    database: Literal["sqlite", "postgresql"] = "sqlite"


class ServiceConfig(Section):
    """The inference service (`defectops api`, flows/service/): see docs/serving.md."""

    host: str = "127.0.0.1"  # bind address; 127.0.0.1 unless configured
    port: Annotated[int, Field(gt=0, lt=65536)] = 8000
    autostart: bool = True  # `defectops up` starts it with the other services
    lines: tuple[str, ...] | None = None  # lines served (None: every line of `lines`)
    preload_challenger: bool = False  # else @challenger is loaded on its first request
    poll_s: Annotated[float, Field(gt=0)] = 10.0  # how often the registry aliases are checked
    batch_window_ms: Annotated[float, Field(ge=0)] = 0.0
    max_batch: PositiveInt = 32
    max_request_bytes: PositiveInt = 64 * 2**20
    max_images_per_request: PositiveInt = 64
    max_image_pixels: PositiveInt = 40_000_000
    keep_images: Literal["none", "defective", "all"] = "all"  # kept for review under services.root

    @field_validator("keep_images", mode="before")
    @classmethod
    def _decision_word(cls, value):
        return "defective" if value == "anomalous" else value  # the word before one word was used everywhere

    @field_validator("host")
    @classmethod
    def _ip(cls, host: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (e.g. 127.0.0.1, or 0.0.0.0 for all)") from None
        return host


def _check_timezone(name: str) -> str:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}: use an IANA name such as UTC or Europe/Berlin") from None
    return name


class ScheduledInferenceConfig(Section):
    """`defectops serve`: a deployment scoring `images` with the line's @champion on `cron` (flows/schedules.py)."""

    cron: str
    images: list[Path] = Field(min_length=1)  # files or folders, relative to params.yaml; all scored each run


class LineConfig(Section):
    data: Path
    cron: str = "0 3 * * *"
    timezone: str = "UTC"  # IANA timezone of `cron` and `inference.cron` (daylight saving time followed)
    inference: ScheduledInferenceConfig | None = None  # scheduled batch inference, none by default
    max_train_images: PositiveInt | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Serve this line from another registered model's @champion (a unified model trained on several lines,
    # e.g. `defectops-unified-plant`) instead of its own `defectops-<line>`; None: its own model.
    serve_from: str | None = None

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        return _check_timezone(name)


class Config(Section):
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    detector: DetectorConfig = DetectorConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    export: ExportConfig = ExportConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    services: ServicesConfig = ServicesConfig()
    service: ServiceConfig = ServiceConfig()
    lines: dict[str, LineConfig] = Field(default_factory=dict)

    @field_validator("lines")
    @classmethod
    def _line_names(cls, lines: dict[str, LineConfig]) -> dict[str, LineConfig]:
        for name in lines:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"product line name {name!r} must match {NAME_PATTERN.pattern}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """sha256 of the canonical JSON of everything that shapes a model (services, service, export,
        monitoring and lines excluded)."""
        payload = self.model_dump(mode="json", exclude={"services", "service", "export", "monitoring", "lines"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def for_line(self, line: str) -> Config:
        """This config with the line's own `overrides` applied on top."""
        if line not in self.lines:
            raise ConfigError(f"unknown product line {line!r}; params.yaml has {sorted(self.lines)}")
        overrides = self.lines[line].overrides
        if not overrides:
            return self
        raw = self.to_dict()
        for key, value in flatten(overrides).items():
            set_path(raw, key, value)
        return validate(raw, source=f"lines.{line}.overrides")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections; refuses to descend into a non-dict."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` with the value parsed as YAML (so 0.1, true, [1, 2] and strings all work)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), parsed


def validate(raw: dict[str, Any], source: str = "params.yaml") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"  {path}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                line: str | None = None) -> Config:
    """Read params.yaml (or the embedded defaults when path is None), apply `line`'s own
    `lines.<line>.overrides` (when a line is named), then the `--set` overrides, and validate once.

    Relative `lines.*.data` paths are resolved against the params file's folder. ConfigError for an unknown
    line.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = copy.deepcopy(loaded or {})
        base = path.resolve().parent
    if line is not None:
        lines = raw.get("lines") if isinstance(raw.get("lines"), dict) else {}
        if line not in lines:
            raise ConfigError(f"unknown product line {line!r}; {source} has {sorted(lines)}")
        own = lines[line].get("overrides") if isinstance(lines[line], dict) else None
        if isinstance(own, dict):
            for key, value in flatten(own).items():
                set_path(raw, key, value)
    for text in overrides:
        key, value = parse_override(text)
        set_path(raw, key, value)
    if overrides:
        source = f"{source} with --set {' '.join(overrides)}"
    cfg = validate(raw, source=source)
    return _resolve_line_paths(cfg, base)


def _resolve_line_paths(cfg: Config, base: Path) -> Config:
    if not cfg.lines:
        return cfg
    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    lines = {}
    for name, line in cfg.lines.items():
        update: dict[str, Any] = {"data": resolve(line.data)}
        if line.inference is not None:
            update["inference"] = line.inference.model_copy(
                update={"images": [resolve(p) for p in line.inference.images]})
        lines[name] = line.model_copy(update=update)
    return cfg.model_copy(update={"lines": lines})
