"""Schedules: one Prefect deployment of the retrain flow per product line, on the line's `cron` in the line's
`timezone` (IANA name, default UTC; daylight saving time is followed), and one of the inference flow per line
with `lines.<line>.inference` (`cron`, `images`: files or folders whose images are all scored each run).

    deps = deployments("params.yaml")        # validated, nothing sent yet
    serve("params.yaml")                     # registers them on PREFECT_API_URL and runs them (blocks)

`defectops serve --detach` (or `defectops up` with `services.schedules: true`) runs `serve` as a managed
background service (infra/scheduler.py) that `defectops status` lists and `defectops down` stops first.

Cron schedules need a real Prefect server (the temporary one refuses to schedule): `defectops up` starts
one and `defectops serve` points PREFECT_API_URL at it. The server's scheduler creates SCHEDULED flow runs
for each deployment; the serving process picks them up when due and runs them in subprocesses, with the
environment it was started with (object store, MLflow).
"""

from __future__ import annotations

import logging
from pathlib import Path

from components.config import ConfigError, load_config

logger = logging.getLogger(__name__)

DEPLOYMENT_PREFIX = "retrain-"
INFERENCE_PREFIX = "inference-"
MONITOR_PREFIX = "monitor-"


def deployment_name(line: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{line}"


def inference_deployment_name(line: str) -> str:
    return f"{INFERENCE_PREFIX}{line}"


def check_cron(line: str, cron: str, timezone: str | None = None, key: str = "cron") -> None:
    """ConfigError naming `lines.<line>.<key>` when the expression (in `timezone`) is not a valid schedule."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        errors = exc.errors() if hasattr(exc, "errors") else [{"msg": str(exc)}]
        reason = "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors)
        raise ConfigError(f"lines.{line}.{key} = {cron!r} (timezone {timezone or 'UTC'}): not a valid cron "
                          f"schedule ({reason})") from None


def _inference_deployment(line: str, spec, params_path: Path, timezone: str):
    """The scheduled batch inference of `line` (spec: ScheduledInferenceConfig)."""
    from prefect.client.schemas.schedules import construct_schedule
    from prefect.deployments.runner import EntrypointType

    from flows.inference import inference

    check_cron(line, spec.cron, timezone, "inference.cron")
    return inference.to_deployment(
        name=inference_deployment_name(line), schedule=construct_schedule(cron=spec.cron, timezone=timezone),
        parameters={"product_line": line, "images": [str(p) for p in spec.images], "params_path": str(params_path)},
        tags=["defectops", f"line:{line}", "inference"], entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"Score {', '.join(map(str, spec.images))} with {line}'s @champion on cron {spec.cron!r} "
                    f"({timezone})")


def deployments(params_path: str | Path, lines: list[str] | None = None, timezone: str | None = None) -> list:
    """RunnerDeployments of `flows.retrain.retrain`, one per line (all lines of params.yaml by default), each
    on its line's `cron` in its `timezone` (`timezone` given here overrides every line's), plus one of
    `flows.inference.inference` per line that has `inference:`."""
    from prefect.client.schemas.schedules import construct_schedule
    from prefect.deployments.runner import EntrypointType

    from flows.retrain import retrain

    params_path = Path(params_path).resolve()
    cfg = load_config(params_path)
    chosen = list(lines) if lines else sorted(cfg.lines)
    unknown = sorted(set(chosen) - set(cfg.lines))
    if unknown or not chosen:
        raise ConfigError(f"{params_path}: no product line {unknown or ''} under `lines:` "
                          f"(known: {sorted(cfg.lines)})")
    out = []
    for line in chosen:
        spec = cfg.lines[line]
        cron, tz = spec.cron, timezone or spec.timezone
        check_cron(line, cron, tz)
        out.append(retrain.to_deployment(
            name=deployment_name(line), schedule=construct_schedule(cron=cron, timezone=tz),
            parameters={"product_line": line, "params_path": str(params_path)},
            tags=["defectops", f"line:{line}"], description=f"Retrain product line {line} on cron {cron!r} ({tz})",
            entrypoint_type=EntrypointType.MODULE_PATH))
        logger.info("deployment %s: cron %r (%s)", deployment_name(line), cron, tz)
        if spec.inference is not None:
            out.append(_inference_deployment(line, spec.inference, params_path, tz))
            logger.info("deployment %s: cron %r (%s)", inference_deployment_name(line), spec.inference.cron, tz)
        monitoring = cfg.for_line(line).monitoring
        if monitoring.cron:
            out.append(_monitor_deployment(line, monitoring.cron, params_path, tz))
    return out


def _monitor_deployment(line: str, cron: str, params_path: Path, timezone: str):
    """The drift monitor of `line` (flows/monitor.py) on `monitoring.cron`."""
    from prefect.client.schemas.schedules import construct_schedule
    from prefect.deployments.runner import EntrypointType

    from flows.monitor import monitor

    check_cron(line, cron, timezone, "monitoring.cron")
    return monitor.to_deployment(
        name=f"{MONITOR_PREFIX}{line}", schedule=construct_schedule(cron=cron, timezone=timezone),
        parameters={"product_line": line, "params_path": str(params_path)},
        tags=["defectops", f"line:{line}", "monitor"], entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"Drift check of {line}'s recorded decisions on cron {cron!r} ({timezone})")


def serve(params_path: str | Path, lines: list[str] | None = None, limit: int | None = 1) -> None:
    """Register the deployments on the Prefect server and run their scheduled runs (blocks until stopped).
    `limit` caps concurrent runs (retrains are CPU-heavy)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(params_path, lines), limit=limit, print_starting_message=True)
