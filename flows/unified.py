"""The unified retrain flow: ONE Dinomaly model for several product lines (the paper's multi-class setting).

version every line's data -> fit one model on all of them (components.dinomaly.unified.fit_unified, one
calibrated threshold per line) -> save and upload once -> evaluate per line -> register one version of
`defectops-unified-<name>` -> gate it per line (promote.decide against the unified champion's metrics on
that line; promoted only if every line passes). Lines then serve from it with `lines.<line>.serve_from`.

    result = retrain_unified("plant", ["cookie", "pcb"], "params.yaml")
    result["version"], result["promoted"], result["reasons_by_line"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.config import Config
from components.data import scan_line
from components.detector import load_detector
from components.dinomaly.unified import fit_unified
from components.evaluation import evaluate_split
from flows import promote, registry, tracking, versioning
from flows.evaluation_artifacts import write_evaluation
from flows.names import unified_name
from flows.steps import (
    RetrainError,
    TrainLog,
    check_store,
    check_stored_candidate,
    check_unified_name,
    checkpoint_dir,
    fail_run,
    register,
    run_label,
    services_root,
    start_flow_run,
    unified_config,
    upload_model,
)

__all__ = ["retrain_unified", "unified_config", "unified_name"]

logger = logging.getLogger(__name__)

KEEP = ("image_auroc", "aupro", "pixel_auroc", "image_ap", "pixel_ap", "ms_per_image")


def combined_hash(values: dict[str, str]) -> str:
    """sha256 of {line: hash} (sorted): one hash standing for every line's data."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def mean_metrics(per_line: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean over lines of every top-level numeric metric all lines have (per-defect keys excluded)."""
    common = set.intersection(*(set(m) for m in per_line.values())) if per_line else set()
    out = {}
    for key in sorted(k for k in common if "." not in k):
        values = [per_line[line][key] for line in per_line]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = float(sum(values) / len(values))
    return out


def decide_lines(candidate: dict[str, dict], references: dict[str, dict | None], cfg) -> promote.Decision:
    """promote.decide per line (reference None: absolute floors); promoted only if every line passes.
    Reasons are prefixed with the line."""
    reasons, ok = [], True
    for line in sorted(candidate):
        decision = promote.decide(candidate[line], references.get(line), cfg)
        ok = ok and decision.promote
        reasons += [f"{line}: {r}" for r in decision.reasons]
    return promote.Decision(ok, reasons)


# ------------------------------------------------------------------------------------------------ tasks

@task(cache_policy=NO_CACHE)
def version_line_data(run_id: str, line: str, source: str, registry: str, max_train_images: int | None,
                      snapshot: str) -> dict:
    """Version one line's data (DVC add/commit/push, private snapshot); its hashes go on the run as
    `<line>.dvc_data_hash` etc."""
    data = versioning.version_line(line, Path(source), Path(registry), max_train_images,
                                   snapshot_to=Path(snapshot)).to_dict()
    tracking.set_run_tags(run_id, {f"{line}.dvc_data_hash": data["dvc_md5"],
                                   f"{line}.dvc_remote_path": data["remote_path"],
                                   f"{line}.eval_data_hash": data["eval_data_hash"]})
    tracking.log_metrics(run_id, {f"{line}.data.n_files": data["n_files"], f"{line}.data.bytes": data["size"]})
    return data


@task(cache_policy=NO_CACHE)
def build_unified(run_id: str, cfg: Config, data_paths: dict[str, str], model_dir: str,
                  checkpoints: str) -> dict:
    """Fit one Dinomaly on every line's snapshot (per-step `train.*` metrics, checkpoints for a retry),
    calibrate a threshold per line, save it."""
    train_log = TrainLog(run_id)
    fitted = fit_unified(cfg, data_paths, log_step=train_log, checkpoint_dir=checkpoints)
    train_log.flush()
    detector = fitted.detector
    missing = sorted(set(data_paths) - set(detector.line_thresholds_))
    if missing:
        raise ValueError(f"unified model: no calibrated threshold for {missing} (calibration_fraction is 0 or "
                         "the line has too few train images): it could not serve them")
    detector.save(model_dir)
    shutil.rmtree(checkpoints, ignore_errors=True)
    tracking.log_metrics(run_id, {"fit_s": fitted.fit_seconds, "calibration_s": fitted.calibration_seconds,
                                  "n_fit": fitted.n_fit, "n_calibration": fitted.n_calibration,
                                  "fit": dict(detector.fit_stats_), "train.steps_logged": train_log.steps_logged})
    return {"model_dir": model_dir, "weights_sha256": detector.weights_.sha256, "label": detector.label,
            "encoder_kind": detector.params.encoder, "paper_encoder": not detector.params.is_variant}


@task(cache_policy=NO_CACHE)
def evaluate_line(run_id: str, model_dir: str, line: str, data_path: str, cfg: Config, out_dir: str) -> dict:
    """Score `line`'s pinned test split with the saved model and that line's threshold; metrics go to the
    run as `<line>.<metric>`, curves and overlays under `evaluation/<line>/`."""
    detector = load_detector(model_dir).for_line(line)
    split = scan_line(data_path)
    result = evaluate_split(detector, split, cfg)
    metrics = result.metrics()
    tracking.log_metrics(run_id, {line: metrics})
    write_evaluation(result, detector.threshold_, Path(out_dir), cfg.evaluation.worst_misses, split=split,
                     data=cfg.data, fpr_limit=cfg.evaluation.aupro_fpr_limit)
    tracking.log_artifacts(run_id, Path(out_dir), f"evaluation/{line}")
    return metrics


@task(cache_policy=NO_CACHE)
def gate_unified(name: str, version: str, per_line: dict[str, dict], eval_hashes: dict[str, str],
                 cfg: Config, data_paths: dict[str, str], work_dir: str) -> dict:
    """Per-line gate against the unified @champion; records the decision and moves the aliases, under the
    model's promotion lock (concurrent retrains decide one after the other, as in promote.apply_gate)."""
    with promote.gate_lock(name):
        return _gate_unified_locked(name, version, per_line, eval_hashes, cfg, data_paths, work_dir)


def _gate_unified_locked(name: str, version: str, per_line: dict[str, dict], eval_hashes: dict[str, str],
                         cfg: Config, data_paths: dict[str, str], work_dir: str) -> dict:
    candidate = registry.get_version(name, version)
    champion_version = registry.version_for_alias(name, promote.CHAMPION)
    references: dict[str, dict | None] = {line: None for line in per_line}
    notes: list[str] = []
    if champion_version is not None and champion_version != version:
        references, notes = _champion_references(name, champion_version, eval_hashes, cfg, data_paths, work_dir)
    gated = decide_lines(per_line, references, cfg.promotion)
    decision = promote.Decision(gated.promote, notes + gated.reasons)
    _record(name, candidate, decision, champion_version, per_line)
    registry.set_alias(name, promote.CHALLENGER, version)
    if decision.promote:
        registry.set_alias(name, promote.CHAMPION, version)
    return decision.to_dict()


def _champion_references(name: str, version: str, eval_hashes: dict[str, str], cfg: Config,
                         data_paths: dict[str, str], work_dir: str) -> tuple[dict[str, dict | None], list[str]]:
    """The champion's metrics per line: recorded ones when measured on the same pinned data, else
    re-evaluated; None (absolute floors) for a line the champion was not trained on."""
    champion = registry.get_version(name, version)
    tags = champion["tags"]
    trained_on = json.loads(tags.get("lines", "[]"))
    recorded = promote.metrics_from_tags(tags)
    refs: dict[str, dict | None] = {}
    notes, detector = [], None
    for line in sorted(eval_hashes):
        if line not in trained_on:
            refs[line] = None
            notes.append(f"{line}: champion {name} version {version} was not trained on it: absolute floors apply")
        elif tags.get(f"data.{line}.eval_data_hash") == eval_hashes[line]:
            refs[line] = {k: recorded.get(f"{line}.{k}") for k in promote.GATED_METRICS}
            notes.append(f"{line}: champion is {name} version {version}, evaluated on the same pinned data")
        else:
            if detector is None:
                detector, _ = registry.load_version(name, version, Path(work_dir) / f"champion-v{version}")
            same_eval = detector.cfg.model_copy(update={"evaluation": cfg.evaluation})
            refs[line] = evaluate_split(detector.for_line(line), scan_line(data_paths[line]), same_eval).metrics()
            notes.append(f"{line}: champion {name} version {version} re-evaluated on the candidate's pinned data")
    return refs, notes


def _record(name: str, candidate: dict, decision: promote.Decision, champion_before: str | None,
            per_line: dict[str, dict]) -> None:
    by_line = {line: [r for r in decision.reasons if r.startswith(f"{line}: ")] for line in per_line}
    promote.record_decision(name, candidate, decision, datetime.now(UTC).isoformat(timespec="seconds"), {
        "champion_before": champion_before, "reasons_by_line": by_line,
        "candidate_metrics": {line: {k: m.get(k) for k in promote.GATED_METRICS} for line, m in per_line.items()}})


# ------------------------------------------------------------------------------------------------ flow

def _version_tags(cfg: Config, info: dict, data: dict[str, dict], model: dict, per_line: dict[str, dict],
                  label: str) -> dict[str, Any]:
    means = mean_metrics(per_line)
    return {"git_commit": info["git_commit"], "git_dirty": info["git_dirty"], "flow_run_id": info["flow_run_id"],
            "dvc_data_hash": combined_hash({k: d["dvc_md5"] for k, d in data.items()}),
            "dvc_remote_path": json.dumps({k: d["remote_path"] for k, d in data.items()}, sort_keys=True),
            "eval_data_hash": combined_hash({k: d["eval_data_hash"] for k, d in data.items()}),
            "params_hash": cfg.digest(), "weights_sha256": model["weights_sha256"], "product_line": label,
            "method": "dinomaly", "backbone": cfg.backbone.name, "lines": sorted(data),
            "encoder_kind": model["encoder_kind"], "paper_encoder": model["paper_encoder"],
            "data": {line: {"dvc_data_hash": d["dvc_md5"], "eval_data_hash": d["eval_data_hash"],
                            "dvc_registry_commit": d["registry_commit"]} for line, d in data.items()},
            "metrics": {**{k: means[k] for k in KEEP if k in means},
                        **{line: {k: m[k] for k in KEEP if k in m} for line, m in per_line.items()}}}


def _unified_params(cfg: Config, lines: list[str]) -> dict[str, Any]:
    """Everything that shapes the model (only the dinomaly detector section) plus the lines' data."""
    raw = cfg.model_dump(mode="json", exclude={"services", "lines"})
    raw["detector"] = {"method": "dinomaly", "dinomaly": raw["detector"]["dinomaly"]}
    return {**raw, "lines": {line: {"data": str(cfg.lines[line].data),
                                    "max_train_images": cfg.lines[line].max_train_images} for line in lines}}


@flow(name="retrain-unified", flow_run_name="retrain-unified-{name}")
def retrain_unified(name: str, lines: list[str] | None = None, params_path: str = "params.yaml",
                    overrides: list[str] | None = None) -> dict:
    """Train ONE Dinomaly on `lines` (default: every line of params.yaml), register it once as
    `defectops-unified-<name>` and gate it per line; returns a summary dict."""
    t_start = time.perf_counter()
    check_unified_name(name)
    cfg, chosen = unified_config(params_path, lines, overrides or [])
    root, registered, label = services_root(cfg), unified_name(name), f"unified-{name}"
    tracking.configure(root=root)
    run_id, info = start_flow_run(label, cfg, kind="retrain-unified")
    work, step = root / "work" / run_id, "log params"
    try:
        tracking.log_params(run_id, _unified_params(cfg, chosen))
        tracking.set_run_tags(run_id, {"lines": chosen, "model_name": registered})
        step = "check object store"
        endpoint = check_store()
        data = {}
        for line in chosen:
            step = f"version data ({line})"
            data[line] = version_line_data(run_id, line, str(cfg.lines[line].data), str(root / "data-registry"),
                                           cfg.lines[line].max_train_images, str(work / "data" / line))
        paths = {line: d["path"] for line, d in data.items()}
        step = "build model"
        ckpt = checkpoint_dir(root, registered, cfg, combined_hash({k: d["dvc_md5"] for k, d in data.items()}))
        model = build_unified(run_id, cfg, paths, str(work / "model"), str(ckpt))
        step = "upload model"
        bank = upload_model(run_id, model["model_dir"], label)
        step = "check stored model"
        check_stored_candidate(run_id, bank, model["model_dir"], paths[chosen[0]], str(work), label)
        per_line = {}
        for line in chosen:
            step = f"evaluate ({line})"
            per_line[line] = evaluate_line(run_id, model["model_dir"], line, paths[line], cfg,
                                           str(work / "evaluation" / line))
        means = mean_metrics(per_line)
        tracking.log_metrics(run_id, means)
        step = "register"
        version = register(run_id, registered, bank, endpoint, _version_tags(cfg, info, data, model, per_line, label),
                           run_label("retrain-unified", label))
        step = "promote"
        decision = gate_unified(registered, version, per_line, {k: d["eval_data_hash"] for k, d in data.items()},
                                cfg, paths, str(work))
        tracking.log_metrics(run_id, {"retrain_s": time.perf_counter() - t_start})
    except BaseException as exc:
        fail_run(run_id, step, exc)
        raise RetrainError(f"retrain-unified {name} ({', '.join(chosen)}) failed at step '{step}': {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tracking.end_run(run_id)
    return {"name": name, "model_name": registered, "lines": chosen, "run_id": run_id, "version": version,
            "promoted": decision["promote"], "reasons": decision["reasons"],
            "reasons_by_line": {line: [r for r in decision["reasons"] if r.startswith(f"{line}: ")] for line in chosen},
            "champion": registry.version_for_alias(registered, promote.CHAMPION), **info, "label": model["label"],
            "encoder_kind": model["encoder_kind"], "paper_encoder": model["paper_encoder"],
            "data": {line: {k: d[k] for k in ("dvc_md5", "remote_path", "eval_data_hash")} for line, d in data.items()},
            "bank_uri": bank["uri"], "bank_sha256": bank["sha256"], "metrics": means, "line_metrics": per_line,
            "seconds": time.perf_counter() - t_start}
