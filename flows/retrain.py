"""The retrain flow: version the data -> extract features (cached) -> build and upload the model -> evaluate
-> register -> promotion gate, from the steps in flows.steps. Every task logs into one MLflow run; tasks pass
the Config, paths, URIs and digests, never tensors. Retries are on network I/O only (DVC push, object store
upload).

    result = retrain("cookie", "params.yaml", ["detector.patchcore.coreset_ratio=0.05"])
    result["version"], result["promoted"], result["reasons"]

On any failure the MLflow run is ended FAILED with the failing step and the error as tags, no alias is
moved (aliases move only inside the gate, after everything else succeeded) and the flow run fails with a
`RetrainError` naming the line, the step and the cause.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.config import ConfigError, load_config
from flows import debris, export_gate, promote, registry, tracking
from flows.names import model_name
from flows.steps import (
    RetrainError,
    build_model,
    check_store,
    check_stored_candidate,
    checkpoint_dir,
    evaluate_model,
    extract_features,
    fail_run,
    gate,
    line_config,
    line_params,
    register,
    run_label,
    services_root,
    start_flow_run,
    upload_model,
    version_data,
    version_tags,
)
from infra import faults

__all__ = ["RetrainError", "model_name", "retrain", "retrain_all", "run_retrain_all"]


@flow(name="retrain", flow_run_name="retrain-{product_line}")
def retrain(product_line: str, params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Retrain one product line end to end; returns a summary dict (version, decision, hashes, URIs)."""
    t_start = time.perf_counter()
    cfg = line_config(params_path, product_line, overrides or [])
    spec, root, name = cfg.lines[product_line], services_root(cfg), model_name(product_line)
    tracking.configure(root=root)
    run_id, info = start_flow_run(product_line, cfg)
    debris.clean_work(root, keep=run_id)
    work, step = root / "work" / run_id, "log params"
    try:
        tracking.log_params(run_id, line_params(cfg, product_line))
        step = "check object store"
        endpoint = check_store()
        step = "version data"
        data = version_data(run_id, product_line, str(spec.data), str(root / "data-registry"),
                            spec.max_train_images, str(work / "data"))
        step = "extract features"
        features = extract_features(run_id, cfg, data["path"], data["dvc_md5"], str(root / "cache" / "features"))
        step = "build model"
        model = build_model(run_id, cfg, data["path"], features, str(work / "model"),
                            str(checkpoint_dir(root, name, cfg, data["dvc_md5"])))
        step = "upload model"
        bank = upload_model(run_id, model["model_dir"], product_line)
        faults.reached("upload.done")
        step = "evaluate"
        metrics = evaluate_model(run_id, model["model_dir"], data["path"], cfg, str(work / "evaluation"))
        step = "export"
        exported = export_gate.export_candidate(run_id, model["model_dir"], data["path"], cfg,
                                                str(work / "export"), product_line)
        step = "check stored model"
        check_stored_candidate(run_id, bank, model["model_dir"], data["path"], str(work), product_line)
        step = "register"
        version = register(run_id, name, bank, endpoint,
                           {**version_tags(cfg, info, data, model, metrics, product_line), **exported["tags"]},
                           run_label("retrain", product_line))
        step = "promote"
        decision = gate(name, version, metrics, data["eval_data_hash"], cfg, data["path"], str(work))
        tracking.log_metrics(run_id, {"retrain_s": time.perf_counter() - t_start})
    except BaseException as exc:
        fail_run(run_id, step, exc, root)
        raise RetrainError(f"retrain {product_line} failed at step '{step}': {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tracking.end_run(run_id)
    return {"line": product_line, "model_name": name, "run_id": run_id, "version": version,
            "promoted": decision["promote"], "reasons": decision["reasons"],
            "champion": registry.version_for_alias(name, promote.CHAMPION), **info,
            "dvc_data_hash": data["dvc_md5"], "dvc_remote_path": data["remote_path"],
            "eval_data_hash": data["eval_data_hash"], "bank_uri": bank["uri"], "bank_sha256": bank["sha256"],
            "feature_cache_hit": features["cache_hit"], "metrics": metrics, "export": exported, "seconds": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------ fan-out

@task(cache_policy=NO_CACHE)
def retrain_line(line: str, params_path: str) -> dict:
    return retrain(line, params_path)


@flow(name="retrain-all")
def retrain_all(params_path: str = "params.yaml") -> list[dict]:
    """Retrain every product line of params.yaml in parallel (run it through `run_retrain_all`, which
    sets the Dask task runner). Fails after all lines finished if any of them failed."""
    lines = sorted(load_config(params_path).lines)
    if not lines:
        raise ConfigError(f"{params_path}: no product lines under `lines:`")
    futures = {line: retrain_line.submit(line, params_path) for line in lines}
    results, failed = [], []
    for line, future in futures.items():
        try:
            results.append(future.result())
        except Exception as exc:  # noqa: BLE001 - every line is reported, then the flow fails
            failed.append(f"{line}: {exc}")
    if failed:
        raise RetrainError(f"{len(failed)} of {len(lines)} lines failed: " + "; ".join(failed))
    return results


def run_retrain_all(params_path: str = "params.yaml", workers: int = 2) -> list[dict]:
    """retrain_all on a local Dask cluster of `workers` processes (scratch space under TMPDIR)."""
    from prefect_dask import DaskTaskRunner

    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "dask-scratch-space"
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                            "dashboard_address": None, "local_directory": str(scratch)})
    return retrain_all.with_options(task_runner=runner)(params_path)
