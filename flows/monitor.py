"""Drift monitoring: one Prefect flow per line, on `monitoring.cron` (`defectops serve`) or by hand
(`defectops monitor LINE`).

Each run reads the latest `monitoring.window` decisions of the line's current @champion version recorded
by the inference service and by batch inference (both in `<services.root>/serving/decisions.sqlite`,
flows/service/decisions.py; batch rows have alias "batch"), and compares them with the champion's
calibration (`calibration.json` in its model folder: out-of-fold good scores, brightness, contrast) with
components/drift.py. Metrics and a score/brightness histogram go to an MLflow run (kind=monitor). A
drifting window is an alert: a log line (WARNING), a Prefect event `defectops.drift.detected` and a
Prefect markdown artifact `drift-<line>`. When the last `monitoring.persist` checks of NEW windows all
drifted, the reviewed false alarms (accepted on the operator page) are copied into the line's train/good
(`export_false_alarms`; the retrain's `dvc add` versions them) and the line's retrain deployment
(`retrain/retrain-<line>`) is started; the promotion gate still decides.

    result = monitor("cookie", "params.yaml")
    result["drift"], result["reasons"], result["retrain"]
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from components.capabilities import MultiLine
from components.config import Config, load_config
from components.data import decode_image
from components.drift import drift_check, persistent
from components.training import brightness_contrast, centroid_distances, preprocess_for
from flows import registry, tracking
from flows.names import serving_model
from flows.schedules import deployment_name

logger = logging.getLogger(__name__)
EVENT = "defectops.drift.detected"


class MonitorError(RuntimeError):
    """A check that cannot run; the message names the line and what is missing."""


def decisions_path(cfg: Config) -> Path:
    return cfg.services.root.resolve() / "serving"


def state_path(cfg: Config, line: str) -> Path:
    return cfg.services.root.resolve() / "monitoring" / f"{line}.json"


def recent_window(store, line: str, version: str, window: int) -> list[dict]:
    """The latest `window` decisions of `line` scored by `version` of its model (service @champion or batch),
    oldest first."""
    rows = [r for r in store.recent(line, limit=max(window * 20, 1000))
            if str(r["model_version"]) == str(version) and r["alias"] in ("champion", "batch")]
    return list(reversed(rows[:window]))


def window_statistics(store, rows: list[dict], cfg: Config, centroid: list[float] | None = None) -> dict[str, list]:
    """scores, rejected, and brightness/contrast of the kept images (the model's own preprocessing), with
    their thumbnail embeddings' distance to the calibration centroid when one is given."""
    preprocess = preprocess_for(cfg.data)
    brightness, contrast, distance = [], [], []
    for r in rows:
        if not r["image_kept"]:
            continue
        data, ext = store.read_image(int(r["id"]))
        image = preprocess.image(decode_image(data, f"decision-{r['id']}{ext}", cfg.data.max_image_pixels))
        b, c = brightness_contrast(image[None])
        brightness += b
        contrast += c
        if centroid is not None:
            distance += centroid_distances(image[None], centroid)
    return {"scores": [float(r["score"]) for r in rows], "rejected": [r["decision"] != "good" for r in rows],
            "brightness": brightness, "contrast": contrast, "centroid_distance": distance}


def _plot(reference: dict, window: dict, threshold: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].hist(reference["image_scores"], bins=20, alpha=0.6, density=True, label="calibration (good)")
    axes[0].hist(window["scores"], bins=20, alpha=0.6, density=True, label="recent window")
    axes[0].axvline(threshold, color="k", linestyle="--", label="threshold")
    axes[0].set_title("image score")
    axes[0].legend(fontsize=7)
    if reference.get("brightness") and window["brightness"]:
        axes[1].hist(reference["brightness"], bins=20, alpha=0.6, density=True, label="calibration")
        axes[1].hist(window["brightness"], bins=20, alpha=0.6, density=True, label="recent window")
        axes[1].legend(fontsize=7)
    axes[1].set_title("brightness (mean pixel)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ tasks

@task(cache_policy=NO_CACHE)
def champion_calibration(name: str, dest: str, line: str | None = None) -> dict:
    """The champion's version, threshold and calibration (scores, image statistics); line: that line's
    view of a unified model."""
    detector, info = registry.load_champion(name, Path(dest))
    if line is not None and isinstance(detector, MultiLine):
        detector = detector.for_line(line)
    t = detector.threshold_
    if t is None or not getattr(detector, "calibration_", None):
        raise MonitorError(f"{name}@champion (version {info['version']}) has no calibration record "
                           f"(calibration.json): it was fitted before drift monitoring existed; retrain it")
    return {"version": str(info["version"]), "threshold": t.image, "target": t.false_reject_rate,
            "calibration": detector.calibration_, "data": detector.cfg.data.model_dump(mode="json")}


@task(cache_policy=NO_CACHE)
def start_retrain(line: str, store_root: str, train_good: str) -> dict:
    """Export the reviewed false alarms into train/good, then start the line's retrain deployment (no wait)."""
    from prefect.deployments import run_deployment

    from flows.service.decisions import DecisionStore, export_false_alarms

    store = DecisionStore(Path(store_root))
    try:
        exported = export_false_alarms(store, line, Path(train_good))
    finally:
        store.close()
    name = f"retrain/{deployment_name(line)}"
    run = run_deployment(name, timeout=0, tags=["defectops", f"line:{line}", "drift"])
    return {"deployment": name, "flow_run_id": str(run.id), "flow_run_name": run.name,
            "feedback_images": exported["exported"], "skipped": exported["skipped"]}


def _alert(line: str, check: dict, version: str, name: str) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    lines = "\n".join(f"- {r}" for r in check["reasons"])
    get_run_logger().warning("DRIFT on line %s (%s version %s, %d decisions): %s", line, name, version,
                             check["n_window"], "; ".join(check["reasons"]))
    emit_event(event=EVENT, resource={"prefect.resource.id": f"defectops.line.{line}", "line": line},
               payload={"model": name, "version": version, "reasons": check["reasons"],
                        "n_window": check["n_window"]})
    create_markdown_artifact(key=f"drift-{line}".lower(), description=f"drift alert for {line}", markdown=(
        f"# Drift on line {line}\n\n{name} version {version}, last {check['n_window']} decisions, reject rate "
        f"{check['reject_rate']:.3f} (expected {check['expected_frr']:.3f}), score PSI {check['psi']:.3f}\n\n{lines}\n"))


# ------------------------------------------------------------------------------------------------ flow

@flow(name="monitor", flow_run_name="monitor-{product_line}")
def monitor(product_line: str, params_path: str = "params.yaml") -> dict:
    """Compare the latest decisions of `product_line` with its champion's calibration; alert on drift and
    start the retrain when it persists (see the module docstring). Returns the check as a dict."""
    cfg = load_config(params_path, line=product_line)
    mon, root = cfg.monitoring, cfg.services.root.resolve()
    tracking.configure(root=root)
    name, unified = serving_model(cfg, product_line)
    work = root / "work" / f"monitor-{product_line}-{runtime.flow_run.id or 'local'}"
    try:
        champ = champion_calibration(name, str(work / "model"), product_line if unified else None)
        rows, window = _read_window(cfg, product_line, champ)
        state_file = state_path(cfg, product_line)
        state = json.loads(state_file.read_text()) if state_file.is_file() else {"history": []}
        result = {"line": product_line, "model_name": name, "version": champ["version"], "n_window": len(rows),
                  "drift": False, "reasons": [], "retrain": None, "alerted": False}
        last_id = rows[-1]["id"] if rows else None
        if len(rows) < mon.min_window:
            result["status"] = f"{len(rows)} decisions of version {champ['version']}: fewer than monitoring.min_window {mon.min_window}, not checked"
            logger.info("monitor %s: %s", product_line, result["status"])
            return result
        if state.get("last_decision_id") == last_id and state.get("version") == champ["version"]:
            result["status"] = "no new decisions since the last check"
            return result
        check = drift_check(champ["calibration"], window, champ["threshold"], champ["target"], mon.alpha, mon.psi_max)
        history = [h for h in state["history"] if h["version"] == champ["version"]][-50:]
        history.append({"time": datetime.now(UTC).isoformat(timespec="seconds"), "drift": check["drift"],
                        "version": champ["version"], "last_decision_id": last_id})
        result.update(drift=check["drift"], reasons=check["reasons"], status="drift" if check["drift"] else "ok",
                      check=check)
        run_id = _log_check(product_line, name, champ, check, window, work)
        if check["drift"]:
            _alert(product_line, check, champ["version"], name)
            result["alerted"] = True
            drifting = [h["drift"] for h in history]
            if persistent(drifting, mon.persist) and mon.retrain:
                spec = cfg.lines[product_line]
                result["retrain"] = start_retrain(product_line, str(decisions_path(cfg)),
                                                  str(Path(spec.data) / "train" / "good"))
                history.append({**history[-1], "drift": False, "retrain": result["retrain"]["flow_run_id"]})
                tracking.set_run_tags(run_id, {"retrain_flow_run": result["retrain"]["flow_run_id"]})
        tracking.end_run(run_id)
        result["run_id"] = run_id
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"history": history, "last_decision_id": last_id,
                                          "version": champ["version"]}, indent=1))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_window(cfg: Config, line: str, champ: dict) -> tuple[list[dict], dict]:
    """The window's decisions and statistics (images preprocessed as the champion's own data config)."""
    from flows.service.decisions import DecisionStore

    model_cfg = cfg.model_copy(update={"data": cfg.data.model_validate(champ["data"])})
    store = DecisionStore(decisions_path(cfg))
    try:
        rows = recent_window(store, line, champ["version"], cfg.monitoring.window)
        return rows, window_statistics(store, rows, model_cfg, champ["calibration"].get("centroid"))
    finally:
        store.close()


def _log_check(line: str, name: str, champ: dict, check: dict, window: dict, work: Path) -> str:
    """One MLflow run (kind=monitor) with the check's metrics, its JSON and the histogram; -> run id
    (left open: the caller tags a started retrain, then ends it)."""
    run_id = tracking.start_run(line, f"monitor-{line}", {
        "kind": "monitor", "model_name": name, "model_version": champ["version"],
        "drift": str(check["drift"]).lower(), "flow_run_id": str(runtime.flow_run.id or "local")})
    tracking.log_metrics(run_id, {"drift": float(check["drift"]), "n_window": check["n_window"],
                                  "score_psi": check["psi"], "reject_rate": check["reject_rate"],
                                  "expected_frr": check["expected_frr"],
                                  **{f"{k}.{m}": v for k, t in check["tests"].items() for m, v in t.items()}})
    plot = _plot(champ["calibration"], window, champ["threshold"], work / "plots" / "drift.png")
    tracking.log_artifacts(run_id, plot.parent, "monitor")
    tracking.log_dict(run_id, {**check, "window_scores": window["scores"]}, "monitor/check.json")
    return run_id


def summary(result: dict) -> str:
    """One line for the console."""
    if "check" not in result:
        return f"{result['line']}: {result.get('status')}"
    c = result["check"]
    tests = ", ".join(f"{k} p={t['p_value']:.2g}" for k, t in c["tests"].items())
    head = "DRIFT" if result["drift"] else "no drift"
    retrain = f"; retrain started: {result['retrain']['flow_run_name']}" if result.get("retrain") else ""
    return (f"{result['line']} v{result['version']}: {head} over {c['n_window']} decisions (reject rate "
            f"{c['reject_rate']:.3f}, expected {c['expected_frr']:.3f}; {tests}; PSI {c['psi']:.2f}){retrain}")

