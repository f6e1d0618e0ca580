"""The inference flow: batch scoring with a line's `@champion`.

The champion's model directory is fetched from the object store (every sha256 verified), the images are
scored, and predictions.csv, predictions.json and one heatmap overlay per image go to the object store under
``inference/<line>/<UTC timestamp>-<flow run id>/`` (content-addressed files plus a manifest). Counts and
the score distribution are logged to an MLflow run in ``defectops/<line>`` tagged ``kind=inference``.

    result = inference("cookie", ["incoming/"], "params.yaml")
    result["results_uri"], result["counts"]
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE

from components.capabilities import MultiLine
from components.config import Config, load_config
from components.data import expand_images
from components.detector import load_detector
from components.prediction import DEFECTIVE, GOOD, write_predictions
from flows import registry, tracking
from flows.names import serving_model
from flows.steps import check_serves, object_store, retry_on_network_error


def score_distribution(scores: np.ndarray) -> dict[str, float]:
    """Summary of image scores (N,): mean, std, min, p50, p95, max."""
    if scores.size == 0:
        return {}
    return {"score_mean": float(scores.mean()), "score_std": float(scores.std()), "score_min": float(scores.min()),
            "score_p50": float(np.percentile(scores, 50)), "score_p95": float(np.percentile(scores, 95)),
            "score_max": float(scores.max())}


# ------------------------------------------------------------------------------------------------ tasks

@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_network_error)
def fetch_champion(name: str, dest: str) -> dict:
    """Download the champion's model directory (sha256 verified); returns its version info."""
    _, info = registry.load_champion(name, Path(dest))
    return {k: info[k] for k in ("name", "version", "run_id", "tags")}


@task(cache_policy=NO_CACHE)
def score_images(model_dir: str, images: list[str], out_dir: str, line: str | None = None) -> dict:
    """Score every image; write predictions.csv/json and overlays/<name>_overlay.png to `out_dir`.
    line: score with that line's threshold of a unified model (Dinomaly.for_line)."""
    detector = load_detector(model_dir)
    if line is not None:
        if not isinstance(detector, MultiLine):
            raise tracking.RegistryError(f"{model_dir}: a {detector.name} model, not a unified one: it cannot "
                                         f"serve line {line!r} through serve_from")
        detector = detector.for_line(line)
    out = Path(out_dir)
    rows = write_predictions(detector, expand_images(images), out, "overlays")
    counts = {"n_images": len(rows), **{f"n_{d}": sum(r["decision"] == d for r in rows) for d in (DEFECTIVE, GOOD)}}
    return {"counts": counts, "distribution": score_distribution(np.array([r["score"] for r in rows])),
            "predictions": rows, "threshold": detector.threshold_.image if detector.threshold_ else None}


@task(cache_policy=NO_CACHE)
def record_decisions(cfg: Config, line: str, name: str, version: str, predictions: list[dict],
                     threshold: float | None) -> int:
    """Append the batch's decisions (alias "batch") to the service's decision record, keeping the images as
    `service.keep_images` says, so the drift monitor (flows/monitor.py) sees batch and served decisions alike."""
    import hashlib

    from PIL import Image

    from flows.service.decisions import Decision, DecisionStore, extension_for

    store = DecisionStore(cfg.services.root.resolve() / "serving")
    try:
        rows, kept = [], []
        for p in predictions:
            data = Path(p["image"]).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            keep = cfg.service.keep_images == "all" or (cfg.service.keep_images == "anomalous"
                                                       and p["decision"] == DEFECTIVE)
            ext = None
            if keep:
                with Image.open(p["image"]) as im:
                    ext = extension_for(im.format)
                store.keep_image(data, sha, ext)
            rows.append(Decision(line, "batch", name, str(version), float(p["score"]), None, threshold,
                                 p["decision"], sha, Path(p["image"]).name, 0.0))
            kept.append(ext)
        return len(store.record(rows, kept))
    finally:
        store.close()


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_network_error)
def upload_results(out_dir: str, prefix: str | list[str]) -> dict:
    obj = object_store().put_dir(Path(out_dir), prefix)
    return {"uri": obj.uri, "sha256": obj.sha256}


# ------------------------------------------------------------------------------------------------ flow

@flow(name="inference", flow_run_name="inference-{product_line}")
def inference(product_line: str, images: list[str], params_path: str = "params.yaml") -> dict:
    """Score `images` (files or folders) with `defectops-<line>@champion`, or with the @champion of the
    unified model named by `lines.<line>.serve_from` and that line's threshold; results to the object store."""
    cfg = load_config(params_path)
    root = cfg.services.root.resolve()
    tracking.configure(root=root)
    name, unified = serving_model(cfg, product_line)
    flow_run_id = str(runtime.flow_run.id or "local")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = root / "work" / f"inference-{stamp}-{flow_run_id}"
    try:
        champion = fetch_champion(name, str(work / "model"))
        if unified:
            check_serves(champion, product_line)
        scored = score_images(str(work / "model"), [str(p) for p in images], str(work / "results"),
                              product_line if unified else None)
        results = upload_results(str(work / "results"), ["inference", product_line, f"{stamp}-{flow_run_id}"])
        record_decisions(cfg, product_line, name, champion["version"], scored["predictions"],
                         scored.get("threshold"))
        run_id = tracking.start_run(product_line, f"inference-{stamp}", {
            "kind": "inference", "flow_run_id": flow_run_id, "model_name": name,
            "model_version": champion["version"], "bank_sha256": champion["tags"].get("bank_sha256", ""),
            "results_uri": results["uri"], "results_sha256": results["sha256"]})
        tracking.log_metrics(run_id, {**scored["counts"], **scored["distribution"]})
        tracking.log_dict(run_id, {"scores": [r["score"] for r in scored["predictions"]]}, "scores.json")
        tracking.end_run(run_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"line": product_line, "model_name": name, "version": champion["version"], "run_id": run_id,
            "results_uri": results["uri"], "results_sha256": results["sha256"], "counts": scored["counts"],
            "distribution": scored["distribution"], "predictions": scored["predictions"]}
