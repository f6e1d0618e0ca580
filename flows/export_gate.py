"""The retrain flow's export step: export the candidate (ONNX, OpenVINO IR), score the pinned evaluation
split with the native model and with each export, log the differences, and store the export (to be
registered with the version) only when it is within `export:` tolerances of params.yaml.

    out = export_candidate(run_id, model_dir, data_path, cfg, work_dir, line)
    out["status"]   # registered | refused | not_exportable | disabled
    out["tags"]     # export.* tags for the model version (export.uri / export.sha256 when registered)

The reference is the native model with an EXACT nearest-bank search (what the export computes); the
differences to the native model as configured (HNSW above 1024 bank entries) are logged beside them
(`export.<format>.vs_default.*`). docs/export.md has the reasoning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from components.config import Config
from components.data import iter_batches, scan_line
from components.detector import load_detector
from components.export import (
    ExportedModel,
    NotExportableError,
    ParityTolerance,
    export_model,
    openvino_missing,
    parity,
    parity_reference,
)
from components.training import preprocess_for
from flows import tracking
from infra.storage import ObjectStore

logger = logging.getLogger(__name__)

EXPORT_PREFIX = "exports"  # s3://<bucket>/exports/<line>/<sha256>/... (content-addressed)


def _retry(task_, task_run, state) -> bool:
    from flows.steps import retry_on_network_error  # lazily: flows.steps is the heavier module

    return retry_on_network_error(task_, task_run, state)


def _finish(run_id: str, status: str, reason: str = "", **tags) -> dict:
    """Tag the run and return the step's result ({status, reason, tags} for the version)."""
    version_tags = {"export.status": status, **({"export.reason": reason[:4000]} if reason else {}), **tags}
    tracking.set_run_tags(run_id, version_tags)
    if status != "registered":
        logger.warning("export not registered (%s): %s", status, reason)
    return {"status": status, "reason": reason, "tags": version_tags}


@task(cache_policy=NO_CACHE)
def export_candidate(run_id: str, model_dir: str, data_path: str, cfg: Config, work_dir: str, line: str) -> dict:
    """Export, compare on the eval split, log `export.*` metrics and parity.json, upload when it passes.
    An export or a comparison that raises is recorded as `failed` (with the error), never fails the run."""
    if not cfg.export.enabled:
        return _finish(run_id, "disabled", "export.enabled is false")
    try:
        out, report, skipped = _export_and_compare(run_id, model_dir, data_path, cfg, Path(work_dir) / "export")
    except NotExportableError as exc:
        return _finish(run_id, "not_exportable", str(exc))
    except Exception as exc:  # noqa: BLE001 - the export is an extra: record why, keep the retrain going
        logger.exception("export of %s failed", model_dir)
        return _finish(run_id, "failed", f"{type(exc).__name__}: {exc}")
    formats = {"export.formats": ",".join(report.formats)}
    if not report.passed:
        return _finish(run_id, "refused", "; ".join(report.reasons), **formats)
    stored = upload_export(str(out), line)
    return _finish(run_id, "registered", skipped, **{"export.uri": stored["uri"], "export.sha256": stored["sha256"],
                                                     **formats})


def _export_and_compare(run_id: str, model_dir: str, data_path: str, cfg, out_dir: Path):
    """-> (export folder, ParityReport, why openvino was skipped or ""); metrics and parity.json logged."""
    ecfg, skipped = cfg.export, ""
    formats = list(ecfg.formats)
    if "openvino" in formats and (why := openvino_missing()):
        formats.remove("openvino")
        skipped = f"openvino skipped: {why}"
        logger.warning(skipped)
    detector = load_detector(model_dir)
    t0 = time.perf_counter()
    out = export_model(detector, out_dir, formats, block=ecfg.search_block, source_dir=model_dir)
    export_s, t1 = time.perf_counter() - t0, time.perf_counter()
    threads = torch.get_num_threads()
    exported = {fmt: ExportedModel.load(out, fmt, threads) for fmt in dict.fromkeys(["onnx", *formats])}
    tolerance = ParityTolerance(ecfg.score_rtol, ecfg.min_decision_agreement, ecfg.map_rtol)
    batches = (b.images for b in iter_batches(scan_line(data_path).test, preprocess_for(cfg.data),
                                              cfg.data.batch_size, max_pixels=cfg.data.max_image_pixels))
    report = parity(parity_reference(detector), exported, batches, detector.threshold_, tolerance, detector)
    metrics = {f"export.{fmt}": {**figures, "vs_default": report.versus_native_default.get(fmt, {})}
               for fmt, figures in report.formats.items()}
    tracking.log_metrics(run_id, {**metrics, "export.passed": float(report.passed), "export.export_s": export_s,
                                  "export.parity_s": time.perf_counter() - t1})
    tracking.log_dict(run_id, {**report.to_dict(), "tolerance": asdict(tolerance), "skipped": skipped},
                      "export/parity.json")
    return out, report, skipped


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_retry)
def upload_export(export_dir: str, line: str) -> dict:
    """Export folder -> exports/<line>/<sha256>/... (content-addressed, with a manifest)."""
    stored = ObjectStore.from_env(connect_timeout=3, max_attempts=2).put_dir(Path(export_dir), [EXPORT_PREFIX, line])
    return asdict(stored)
