"""`defectops api` (the inference service and operator page) and `defectops review-export` (reviewed false
alarms into a line's training data). flows/cli.py registers them with `register(app)`."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from components.config import Config, load_config

console = Console()
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="params.yaml (default: ./params.yaml if present)")]


def _load(config: Path | None) -> Config:
    return load_config(config or (Path("params.yaml") if Path("params.yaml").is_file() else None))


def registry_env(cfg: Config) -> dict[str, str]:
    """Client environment for the registry and object store: empty when DEFECTOPS_S3_ENDPOINT is set
    (remote services, or `defectops up` launched us), else that of the local SeaweedFS and MLflow, which
    must be running."""
    if os.environ.get("DEFECTOPS_S3_ENDPOINT"):
        return {}
    from flows.ops_cli import ServicesDown, services_config
    from infra.services import MLFLOW, SEAWEEDFS, env_for_clients, start, status

    scfg = replace(services_config(cfg), services=(SEAWEEDFS, MLFLOW))
    down = [s.name for s in status(scfg) if not s.healthy]
    if down:
        raise ServicesDown(f"{', '.join(down)} not running under {scfg.root.resolve()}: run `defectops up` first "
                           "(or set DEFECTOPS_S3_ENDPOINT and MLFLOW_TRACKING_URI), or serve local folders "
                           "with --model LINE=DIR")
    return env_for_clients(start(scfg))  # all healthy: start() only reuses them


def _parse_models(models: list[str]) -> dict[str, Path]:
    out = {}
    for item in models:
        line, sep, folder = item.partition("=")
        if not sep or not line or not folder:
            raise ValueError(f"--model {item!r}: expected LINE=MODEL_DIR")
        if not Path(folder).is_dir():
            raise ValueError(f"--model {item!r}: {folder} is not a folder")
        out[line] = Path(folder)
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    def api(config: ConfigOpt = None,
            host: Annotated[str | None, typer.Option(help="bind address (default service.host)")] = None,
            port: Annotated[int | None, typer.Option(help="port (default service.port)")] = None,
            root: Annotated[Path | None, typer.Option(help="services root (default services.root)")] = None,
            model: Annotated[list[str] | None, typer.Option("--model", help="serve a saved model folder as "
                                                            "LINE=DIR instead of the registry")] = None) -> None:
        """Run the inference service and operator page (foreground; `defectops up` runs it in the background)."""
        import uvicorn

        from flows.ops_cli import clear_errors
        from flows.service.app import build, create_app, local_runtime
        from infra.credentials import service_token

        cfg = _load(config)
        folders = _parse_models(model) if model else None  # before anything is written under the root
        root = (root or cfg.services.root).resolve()
        host, port = host or cfg.service.host, port or cfg.service.port
        token = service_token(root)
        with clear_errors():
            if folders:
                runtime = local_runtime(cfg, root, token, folders)
            else:
                os.environ.update(registry_env(cfg))
                from flows import tracking

                tracking.configure(root=root)
                runtime = build(cfg, root, token)
        console.print(f"serving {runtime.table.lines or 'no lines'} at http://{host}:{port}/ "
                      f"(token in $DEFECTOPS_SERVICE_TOKEN or {root / 'service-token.json'})", highlight=False)
        uvicorn.run(create_app(runtime), host=host, port=port, log_level="warning", access_log=False)

    @app.command("review-export")
    def review_export(line: Annotated[str, typer.Argument(help="product line in params.yaml")],
                      config: ConfigOpt = None) -> None:
        """Copy the reviewed (accepted) false alarms of LINE into its train/good folder, so that the next
        `defectops retrain LINE` versions them with DVC and learns them as good."""
        from flows.service.decisions import DecisionStore, ReviewError, export_false_alarms

        cfg = _load(config)
        if line not in cfg.lines:
            raise ValueError(f"unknown product line {line!r}; params.yaml has {sorted(cfg.lines)}")
        store = DecisionStore(cfg.services.root.resolve() / "serving")
        try:
            out = export_false_alarms(store, line, cfg.lines[line].data / "train" / "good")
        except ReviewError as exc:
            raise ValueError(str(exc)) from None
        finally:
            store.close()
        for path in out["exported"]:
            console.print(f"exported {path}", highlight=False)
        for reason in out["skipped"]:
            console.print(f"skipped: {reason}", highlight=False)
        console.print(f"{len(out['exported'])} false alarm(s) exported to {cfg.lines[line].data / 'train' / 'good'}",
                      highlight=False)
