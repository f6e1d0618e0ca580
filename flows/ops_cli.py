"""The pipeline commands of `defectops`: up, down, status, retrain, retrain-all, retrain-unified, inference,
serve, monitor, lineage, gc (demo and prepare: flows/demo_cli.py). flows/cli.py calls `register(app)`.

Clients find the services in this order: DEFECTOPS_S3_ENDPOINT / MLFLOW_TRACKING_URI / PREFECT_API_URL
already in the environment (production services, configured by environment alone), else the local services
that `defectops up` started under `services.root`. Nothing heavy (prefect, mlflow, torch) is imported until
a command runs. Keys are never printed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from components.config import Config, ConfigError, load_config

console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="params.yaml (default: ./params.yaml if present)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a parameter: key.path=value")]


class ServicesDown(RuntimeError):
    """The local services are not running and no remote ones are configured."""


def _params_path(path: Path | None) -> Path:
    if path is not None:
        return path
    if Path("params.yaml").is_file():
        return Path("params.yaml")
    raise ConfigError("no params.yaml in the working directory: pass --config PATH")


def services_config(cfg: Config):
    """components.config.ServicesConfig -> infra.services.ServicesConfig (keys from the environment)."""
    from infra.services import ServicesConfig

    s = cfg.services
    return ServicesConfig(root=s.root, host=s.host, s3_port=s.s3_port, mlflow_port=s.mlflow_port,
                          prefect_port=s.prefect_port, bucket=s.bucket, start_timeout_s=s.start_timeout_s,
                          database=s.database)


def client_env(cfg: Config) -> dict[str, str]:
    """Environment for flows: empty when DEFECTOPS_S3_ENDPOINT is already set (remote services), else the
    endpoints and keys of the local services, which must be running (`defectops up`)."""
    if os.environ.get("DEFECTOPS_S3_ENDPOINT"):
        return {}
    from infra.services import env_for_clients, start, status

    scfg = services_config(cfg)
    down = [s.name for s in status(scfg) if not s.healthy]
    if down:
        raise ServicesDown(f"{', '.join(down)} not running under {scfg.root.resolve()}: run `defectops up` first "
                           "(or set DEFECTOPS_S3_ENDPOINT, MLFLOW_TRACKING_URI and PREFECT_API_URL)")
    return env_for_clients(start(scfg))  # all healthy: start() only reuses them


@contextmanager
def client_session(cfg: Config, env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Set the client environment, a private TMPDIR (Prefect's runner storage, Dask scratch) and a DVC
    site cache under services.root, and point Prefect at PREFECT_API_URL even if it was imported before."""
    env = client_env(cfg) if env is None else env
    root = cfg.services.root.resolve()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"client-{os.getpid()}-", dir=root / "tmp"))
    extra = {"TMPDIR": str(tmp), "DVC_SITE_CACHE_DIR": str(root / "tmp" / "dvc-site"), "DVC_NO_ANALYTICS": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60"}
    saved = {k: os.environ.get(k) for k in [*env, *extra]}
    os.environ.update(env)
    for key, value in extra.items():
        if key == "TMPDIR" or key not in os.environ:
            os.environ[key] = value
    tempfile.tempdir = None
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    api, auth = os.environ.get("PREFECT_API_URL"), os.environ.get("PREFECT_API_AUTH_STRING")
    updates = {**({PREFECT_API_URL: api} if api else {}), **({PREFECT_API_AUTH_STRING: auth} if auth else {})}
    try:
        with temporary_settings(updates=updates):
            try:
                yield env
            finally:
                drain_prefect()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None
        shutil.rmtree(tmp, ignore_errors=True)


def drain_prefect(timeout: float = 15.0) -> None:
    """Send Prefect's queued logs and events now, while the server is still up (at interpreter exit they
    would be retried against a stopped server for minutes)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - best effort: losing a log line must not fail a run
            err_console.print(f"warning: could not flush Prefect {worker.__name__}: {exc}", highlight=False)


def _ui(state) -> dict[str, str]:
    return {"MLflow UI": state.mlflow_uri or "-",
            "Prefect UI": (state.prefect_api_url or "-").removesuffix("/api"),
            "object store (S3)": f"{state.s3_endpoint} bucket {state.bucket}",
            "UI login": f"user defectops, password in {state.root}/service-secrets.json (mlflow_password, "
                        "prefect_password)"}


def _pipeline_errors():
    from flows.gc import GcError
    from flows.lineage import LineageError
    from flows.retrain import RetrainError
    from flows.tracking import RegistryError
    from flows.versioning import VersioningError
    from infra.services import PortInUseError, ServiceStartError
    from infra.storage import StorageError

    return (RetrainError, StorageError, RegistryError, LineageError, VersioningError, ServiceStartError,
            PortInUseError, ServicesDown, GcError)


@contextmanager
def clear_errors() -> Iterator[None]:
    """Pipeline failures print one line (the cause chain) and exit 1 instead of a traceback."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, _pipeline_errors()) or os.environ.get("DEFECTOPS_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        # SystemExit, not typer.Exit: under standalone_mode=False click returns typer.Exit's code from
        # app() and flows.cli.main ignores that return value (it would exit 0).
        raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------------ printing

def _check_json_out(path: Path | None) -> None:
    if path is not None and str(path) != "-":
        from flows.cli import check_writable

        check_writable(path, folder=False)


def write_json(path: Path, payload: dict) -> None:
    """`--json PATH`: written atomically (nothing half-written, no temp file left); `-` is standard output."""
    text = json.dumps(payload, indent=2, default=str)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    from flows.cli import _atomic_write_text

    _atomic_write_text(path, text)


def print_retrain(result: dict) -> None:
    table = Table(title=f"retrain {result['line']}: {result['model_name']} version {result['version']}")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    m = result["metrics"]
    table.add_row("decision", "PROMOTED to @champion" if result["promoted"] else "not promoted (stays @challenger)")
    table.add_row("champion now", f"version {result['champion']}")
    table.add_row("image AUROC / AUPRO", f"{m.get('image_auroc', float('nan')):.4f} / {m.get('aupro', float('nan')):.4f}")
    table.add_row("ms per image", f"{m.get('ms_per_image', float('nan')):.1f}")
    table.add_row("data (DVC)", f"{result['dvc_data_hash']}\n{result['dvc_remote_path']}")
    table.add_row("bank", f"{result['bank_uri']}\nsha256 {result['bank_sha256']}")
    table.add_row("git commit", result["git_commit"])
    table.add_row("feature cache", "hit" if result["feature_cache_hit"] else "miss (features extracted)")
    table.add_row("seconds", f"{result['seconds']:.1f}")
    console.print(table)
    for reason in result["reasons"]:
        console.print(f"  - {reason}", highlight=False)


def print_unified(result: dict) -> None:
    table = Table(title=f"retrain-unified {result['name']}: {result['model_name']} version {result['version']} "
                        f"({result['label']})")
    for col in ("line", "image AUROC", "pixel AUROC", "AUPRO", "ms/image", "gate"):
        table.add_column(col)
    nan = float("nan")
    for line in result["lines"]:
        m = result["line_metrics"][line]
        failed = any(r.endswith(": fail") for r in result["reasons_by_line"][line])
        table.add_row(line, f"{m.get('image_auroc', nan):.4f}", f"{m.get('pixel_auroc', nan):.4f}",
                      f"{m.get('aupro', nan):.4f}", f"{m.get('ms_per_image', nan):.1f}", "fail" if failed else "pass")
    m = result["metrics"]
    table.add_row("mean", f"{m.get('image_auroc', nan):.4f}", f"{m.get('pixel_auroc', nan):.4f}",
                  f"{m.get('aupro', nan):.4f}", f"{m.get('ms_per_image', nan):.1f}", "")
    console.print(table)
    console.print(("PROMOTED to @champion" if result["promoted"] else "not promoted (stays @challenger)")
                  + f"; champion now version {result['champion']}; bank {result['bank_uri']}; "
                  f"{result['seconds']:.1f} s", highlight=False)
    for reason in result["reasons"]:
        console.print(f"  - {reason}", highlight=False)


def print_inference(result: dict) -> None:
    counts, dist = result["counts"], result["distribution"]
    console.print(f"inference {result['line']} with {result['model_name']} version {result['version']}: "
                  f"{counts['n_images']} images, {counts.get('n_defective', 0)} defective, "
                  f"{counts.get('n_good', 0)} good; score median {dist.get('score_p50', float('nan')):.4f}, "
                  f"p95 {dist.get('score_p95', float('nan')):.4f}", highlight=False)
    console.print(f"  results: {result['results_uri']} (sha256 {result['results_sha256'][:16]}…)", highlight=False)


# ------------------------------------------------------------------------------------------------ commands

def register(app: typer.Typer) -> None:
    """Every pipeline command, by group (one nested function per command)."""
    register_services(app)
    register_runs(app)
    from flows.schedule_cli import register as register_schedules

    register_schedules(app)  # `serve`: in the foreground, or --detach as a managed service
    from flows.monitor_cli import register as register_monitor

    register_monitor(app)  # `monitor`: drift of the recorded decisions (issue 15)
    register_records(app)
    from flows.demo_cli import register as register_demo

    register_demo(app)  # `demo` (the main job) and `prepare` (the DVC stage)


def register_services(app: typer.Typer) -> None:
    @app.command()
    def up(config: ConfigOpt = None) -> None:
        """Start the local object store, MLflow server and Prefect server (reusing healthy ones)."""
        from infra.services import start

        params = config or (Path("params.yaml") if Path("params.yaml").is_file() else None)
        cfg = load_config(params)
        with clear_errors():
            state = start(services_config(cfg))
        for name, seconds in state.startup_s.items():
            console.print(f"{name} started in {seconds:.1f} s")
        for key, value in _ui(state).items():
            console.print(f"{key:18} {value}", highlight=False)
        from flows.schedule_cli import start_configured

        with clear_errors():
            start_configured(cfg, params)  # the cron deployments, when services.schedules is true
        if cfg.service.autostart:  # the inference service and operator page (flows/service/)
            from infra.api_service import start_api
            from infra.services import env_for_clients

            with clear_errors():
                api = start_api(services_config(cfg), params, env_for_clients(state), host=cfg.service.host,
                                port=cfg.service.port)
            console.print(f"{'inference service':18} {api.url}/ (operator page; API in docs/serving.md)",
                          highlight=False)

    @app.command()
    def down(config: ConfigOpt = None) -> None:
        """Stop the local services started by `defectops up`."""
        from infra.services import stop

        cfg = load_config(config or (Path("params.yaml") if Path("params.yaml").is_file() else None))
        console.print("stopped: " + (", ".join(stop(services_config(cfg))) or "nothing was running"))

    @app.command()
    def status(config: ConfigOpt = None) -> None:
        """Show whether each local service is alive and healthy."""
        from infra.services import status as service_status

        cfg = load_config(config or (Path("params.yaml") if Path("params.yaml").is_file() else None))
        table = Table(title=f"services under {cfg.services.root.resolve()}")
        for col in ("service", "pid", "alive", "healthy", "url"):
            table.add_column(col)
        from infra.api_service import api_status
        from infra.scheduler import schedules_status

        api = api_status(cfg.services.root)  # the inference service, when `up` started one
        runner = schedules_status(cfg.services.root)  # the cron deployments' runner, when one was started
        for st in [*service_status(services_config(cfg)), *([api] if api else []), *([runner] if runner else [])]:
            table.add_row(st.name, str(st.pid or "-"), str(st.alive), str(st.healthy), st.url)
        console.print(table)


def register_runs(app: typer.Typer) -> None:
    @app.command("retrain")
    def retrain_cmd(line: Annotated[str, typer.Argument(help="product line in params.yaml")],
                    config: ConfigOpt = None, set_: SetOpt = None) -> None:
        """Retrain one line: version data, features, model, evaluate, register, promotion gate."""
        path = _params_path(config)
        cfg = load_config(path)
        from flows.steps import line_config

        line_config(path, line, list(set_ or []))  # an unknown line or a bad --set: one line, exit 2, no flow run
        with clear_errors(), client_session(cfg):
            from flows.retrain import retrain

            print_retrain(retrain(line, str(path), list(set_ or [])))

    @app.command("retrain-all")
    def retrain_all_cmd(config: ConfigOpt = None,
                        workers: Annotated[int, typer.Option(help="Dask worker processes")] = 2) -> None:
        """Retrain every line of params.yaml in parallel on a local Dask cluster."""
        path = _params_path(config)
        cfg = load_config(path)
        with clear_errors(), client_session(cfg):
            from flows.retrain import run_retrain_all

            for result in run_retrain_all(str(path), workers):
                print_retrain(result)

    @app.command("retrain-unified")
    def retrain_unified_cmd(name: Annotated[str, typer.Argument(help="unified model: defectops-unified-NAME")],
                            line: Annotated[list[str] | None, typer.Option("--line", help="only these lines "
                                                                           "(default: all in params.yaml)")] = None,
                            config: ConfigOpt = None, set_: SetOpt = None) -> None:
        """Train ONE Dinomaly model on several lines, register it once, gate it per line."""
        path = _params_path(config)
        cfg = load_config(path)
        from flows.steps import check_unified_name, unified_config

        check_unified_name(name)  # a bad name, an unknown line or a bad --set: one line, exit 2, no flow run
        unified_config(path, list(line or []) or None, list(set_ or []))
        with clear_errors(), client_session(cfg):
            from flows.unified import retrain_unified

            print_unified(retrain_unified(name, list(line or []) or None, str(path), list(set_ or [])))

    @app.command("inference")
    def inference_cmd(line: Annotated[str, typer.Argument(help="product line")],
                      images: Annotated[list[Path], typer.Argument(help="image files or folders")],
                      config: ConfigOpt = None,
                      json_out: Annotated[Path | None, typer.Option("--json", help="write the result here")] = None) -> None:
        """Score images with the line's @champion; results go to the object store."""
        path = _params_path(config)
        cfg = load_config(path)
        _check_json_out(json_out)
        with clear_errors(), client_session(cfg):
            from flows.inference import inference

            result = inference(line, [str(p) for p in images], str(path))
        print_inference(result)
        if json_out:
            write_json(json_out, result)



def register_records(app: typer.Typer) -> None:
    @app.command()
    def lineage(ref: Annotated[str, typer.Argument(help="MODEL@ALIAS or MODEL/VERSION, e.g. defectops-cookie@champion")],
                config: ConfigOpt = None,
                json_out: Annotated[Path | None, typer.Option("--json", help="export the chain as JSON")] = None) -> None:
        """Print the lineage of a registered version, its bank re-verified against the object store."""
        cfg = load_config(config or (Path("params.yaml") if Path("params.yaml").is_file() else None))
        _check_json_out(json_out)
        with clear_errors(), client_session(cfg):
            from flows import tracking
            from flows.lineage import lineage as lineage_of
            from flows.lineage import parse_model_ref, render
            from infra.storage import ObjectStore

            tracking.configure(root=cfg.services.root.resolve())
            info = lineage_of(*parse_model_ref(ref), ObjectStore.from_env())
        console.print(render(info), highlight=False, soft_wrap=True)
        if json_out:
            write_json(json_out, info)
            if str(json_out) != "-":
                console.print(f"lineage written to {json_out}")

    @app.command()
    def gc(config: ConfigOpt = None,
           delete: Annotated[bool, typer.Option("--delete", help="delete them (default: only list them)")] = False,
           min_age_hours: Annotated[float, typer.Option(min=0, help="keep objects younger than this (a "
                                                        "running retrain uploads before it registers)")] = 6.0,
           dvc: Annotated[bool, typer.Option("--dvc", help="also DVC objects no commit of the data registry "
                                             "references (only when it is the bucket's one DVC writer)")] = False
           ) -> None:
        """List (or with --delete remove) model and export objects that no registered version references
        (with --dvc, DVC objects no data registry commit references); MLflow artifacts and inference results
        are never touched."""
        cfg = load_config(config or (Path("params.yaml") if Path("params.yaml").is_file() else None))
        with clear_errors(), client_session(cfg):
            from flows import tracking
            from flows.gc import collect
            from infra.storage import ObjectStore

            tracking.configure(root=cfg.services.root.resolve())
            report = collect(ObjectStore.from_env(), min_age_hours * 3600, delete,
                             dvc_registry=cfg.services.root.resolve() / "data-registry" if dvc else None)
        for key in report["unreferenced"]:
            console.print(f"  {key}", highlight=False)
        verb = "deleted" if delete else "unreferenced (dry run; --delete removes them)"
        console.print(f"{len(report['unreferenced'])} objects, {report['bytes']} bytes {verb}; "
                      f"{report['referenced']} referenced objects kept", highlight=False)
