"""Schedules: one Prefect deployment of the retrain flow per product line, on the line's `cron`.

    deps = deployments("params.yaml")        # validated, nothing sent yet
    serve("params.yaml")                     # registers them on PREFECT_API_URL and runs them (blocks)

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


def deployment_name(line: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{line}"


def check_cron(line: str, cron: str, timezone: str | None = None) -> None:
    """ConfigError naming `lines.<line>.cron` when the expression is not a valid cron schedule."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        errors = exc.errors() if hasattr(exc, "errors") else [{"msg": str(exc)}]
        reason = "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors)
        raise ConfigError(f"lines.{line}.cron = {cron!r}: not a valid cron schedule ({reason})") from None


def deployments(params_path: str | Path, lines: list[str] | None = None, timezone: str | None = None) -> list:
    """RunnerDeployments of `flows.retrain.retrain`, one per line (all lines of params.yaml by default)."""
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
        cron = cfg.lines[line].cron
        check_cron(line, cron, timezone)
        out.append(retrain.to_deployment(
            name=deployment_name(line), schedule=construct_schedule(cron=cron, timezone=timezone),
            parameters={"product_line": line, "params_path": str(params_path)},
            tags=["defectops", f"line:{line}"], description=f"Retrain product line {line} on cron {cron!r}",
            entrypoint_type=EntrypointType.MODULE_PATH))
        logger.info("deployment %s: cron %r", deployment_name(line), cron)
    return out


def serve(params_path: str | Path, lines: list[str] | None = None, limit: int | None = 1) -> None:
    """Register the deployments on the Prefect server and run their scheduled runs (blocks until stopped).
    `limit` caps concurrent runs (retrains are CPU-heavy)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(params_path, lines), limit=limit, print_starting_message=True)
