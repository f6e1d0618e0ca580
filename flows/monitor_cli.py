"""`defectops monitor LINE`: one drift check now (flows/monitor.py), and `defectops demo-drift`, the
monitoring loop end to end (flows/drift_demo.py). Registered on the app by flows.ops_cli.register."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from components.config import load_config
from flows.ops_cli import ConfigOpt, _params_path, clear_errors, client_session, console


def register(app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor_cmd(line: Annotated[str, typer.Argument(help="product line")], config: ConfigOpt = None,
                    json_out: Annotated[Path | None, typer.Option("--json", help="write the check here")] = None) -> None:
        """Compare the line's latest recorded decisions with its champion's calibration (KS, reject rate,
        brightness/contrast); alert on drift, start the retrain when it persists (monitoring.* in params.yaml)."""
        path = _params_path(config)
        cfg = load_config(path)
        with clear_errors(), client_session(cfg):
            from flows.monitor import monitor, summary

            result = monitor(line, str(path))
        console.print(summary(result), highlight=False)
        if json_out:
            json_out.write_text(json.dumps(result, indent=2, default=str))

    @app.command("demo-drift")
    def demo_drift(config: ConfigOpt = None,
                   shift: Annotated[float, typer.Option("--shift", help="brightness factor of the shifted batches")] = 1.3,
                   json_out: Annotated[Path | None, typer.Option("--json", help="write the outcome here")] = None) -> None:
        """The monitoring loop on the demo line: serve the champion, send good parts, then parts under a
        lighting change; the monitor alerts and, when the drift persists, starts the line's retrain."""
        cfg = load_config(config or (Path("params.yaml") if Path("params.yaml").is_file() else None))
        with clear_errors():
            from flows.drift_demo import run_drift_demo

            result = run_drift_demo(cfg, shift)
        if json_out:
            json_out.write_text(json.dumps(result, indent=2, default=str))
