"""`defectops serve`: the cron deployments of flows/schedules.py, in the foreground (Ctrl-C stops) or, with
`--detach`, as a managed background service (infra/scheduler.py) that `defectops status` lists and
`defectops down` stops before the Prefect server. `defectops up` starts it too when params.yaml says
`services.schedules: true`. Registered on the app by flows.ops_cli.register.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from components.config import Config, load_config
from flows.ops_cli import (
    ConfigOpt,
    ServicesDown,
    _params_path,
    clear_errors,
    client_env,
    client_session,
    console,
    services_config,
)

LineOpt = Annotated[list[str] | None, typer.Option("--line", help="only these lines")]


def start_detached(cfg: Config, params: Path, lines: list[str]) -> None:
    """Start the schedule runner in the background and print where it is; ServicesDown without Prefect."""
    from infra.scheduler import start_schedules

    env = client_env(cfg)  # the local services must be healthy unless configured remotely
    if not (env.get("PREFECT_API_URL") or os.environ.get("PREFECT_API_URL")):
        raise ServicesDown("serve needs a Prefect server: run `defectops up` or set PREFECT_API_URL")
    st = start_schedules(services_config(cfg), params, lines)
    log = cfg.services.root.resolve() / "logs" / "schedules.log"
    console.print(f"schedules: runner pid {st.pid} serving {', '.join(lines) or 'every line'} of {params}; "
                  f"health {st.url}/run_count; log {log}; `defectops down` stops it", highlight=False)


def start_configured(cfg: Config, params: Path | None) -> None:
    """For `defectops up`: start the runner when `services.schedules` is true and the params file has lines."""
    if not cfg.services.schedules:
        return
    if params is None or not cfg.lines:
        console.print("services.schedules is true but there is no params file with lines: no schedules started")
        return
    start_detached(cfg, params, [])


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(config: ConfigOpt = None, line: LineOpt = None,
              detach: Annotated[bool, typer.Option("--detach", help="run in the background as a managed "
                                                   "service (`defectops status` / `down`)")] = False) -> None:
        """Register one cron deployment per line (retrain, and inference where configured) on the Prefect
        server and run them: in the foreground (Ctrl-C stops), or with --detach in the background."""
        path = _params_path(config)
        cfg = load_config(path)
        with clear_errors():
            if detach:
                start_detached(cfg, path, list(line or []))
                return
            with client_session(cfg):
                if not os.environ.get("PREFECT_API_URL"):
                    raise ServicesDown("serve needs a Prefect server: run `defectops up` or set PREFECT_API_URL")
                from flows.schedules import serve as serve_deployments

                serve_deployments(path, list(line or []) or None)
