"""The retrain flow end to end against the real local services (SeaweedFS, MLflow server, Prefect server)
started by the test session: a first version becomes champion, a worse configuration is rejected with its
reasons recorded, a better one takes @champion; the stored bank, the DVC data and the lineage are checked
against the object store, the .dvc file and git.

- test_retrain_gate_demo: the demo line (64 px, 6 train images): runs by default. Each version's export
  (ONNX + OpenVINO IR) is registered when it scores like the native model; the second run's zero tolerances
  make the parity gate refuse it, with the reason on the version.
- test_retrain_gate_cookie: ../shared/datasets/cookie (128 px, 10 train images): marked slow.
- test_retrain_all_fans_out: retrain_all on a 2-process Dask cluster, one line broken: marked slow.
- test_demo_command: `defectops demo --stop` as a user runs it (its own services): marked slow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml

from components.detector import load_detector
from components.export import ExportedModel
from flows import registry, tracking
from flows.cli import main
from flows.inference import inference
from flows.lineage import lineage
from flows.retrain import RetrainError, model_name, retrain, run_retrain_all
from flows.versioning import read_dvc_file
from infra.process import find_free_ports
from infra.services import env_for_clients
from infra.storage import ObjectStore, parse_uri
from tests.e2e._pipeline import git_head, session, small_demo_line, tiny_git_repo, write_params

PROJECT = Path(__file__).resolve().parents[2]
COOKIE = PROJECT.parent / "shared" / "datasets" / "cookie"
TOL = {"image_auroc": 0.005, "aupro": 0.01}  # params.yaml defaults, not overridden by write_params


def _worse(metrics: dict, reference: dict) -> bool:
    return any(metrics[k] < reference[k] - tol for k, tol in TOL.items())


def _store(services) -> ObjectStore:
    return ObjectStore(services.s3_endpoint, services.bucket, services.access_key, services.secret_key)


def _check_stored_objects(services, result: dict, root: Path, line: str, tmp: Path) -> None:
    """Bank: every file re-hashed in the store and the downloaded model loads (its sha256s verified).
    Data: the .dvc file's md5 is the one recorded, and the remote .dir object hashes to it."""
    store = _store(services)
    assert store.verify(result["bank_uri"], result["bank_sha256"])
    model_dir = store.get_dir(result["bank_uri"], tmp / f"bank-v{result['version']}", result["bank_sha256"])
    assert load_detector(model_dir).is_fitted
    out = read_dvc_file(root / "data-registry" / "lines" / f"{line}.dvc")
    assert result["dvc_data_hash"] == out["md5"] and out["md5"].endswith(".dir")
    bucket, key = parse_uri(result["dvc_remote_path"])
    assert key == f"dvc/files/md5/{out['md5'][:2]}/{out['md5'][2:]}"
    body = boto3.client("s3", endpoint_url=services.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=services.access_key, aws_secret_access_key=services.secret_key,
                        ).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.md5(body).hexdigest() == out["md5"].removesuffix(".dir")
    assert len(json.loads(body)) == out["nfiles"]


def _check_lineage(services, params: Path, line: str, root: Path, commit: str, champion: str,
                   tmp: Path, capsys) -> None:
    """`defectops lineage MODEL@champion --json` and flows.lineage agree with the .dvc file and git."""
    name = model_name(line)
    dvc_md5 = read_dvc_file(root / "data-registry" / "lines" / f"{line}.dvc")["md5"]
    info = lineage(name, "@champion", _store(services))
    assert info["version"] == champion and "champion" in info["aliases"]
    assert info["data"]["dvc_data_hash"] == dvc_md5
    assert info["code"]["git_commit"] == commit
    assert info["bank"]["verified"] is True and info["bank"]["files"] and all(info["bank"]["files"].values())
    assert info["promotion"]["decision"] == "promoted" and not info["missing_tags"]
    assert info["export"]["status"] == "registered" and info["export"]["verified"] is True
    capsys.readouterr()
    exported = tmp / "lineage.json"
    assert main(["lineage", f"{name}@champion", "--config", str(params), "--json", str(exported)]) == 0
    printed = capsys.readouterr().out
    assert dvc_md5 in printed and commit in printed and "VERIFIED" in printed
    data = json.loads(exported.read_text())
    assert (data["version"], data["data"]["dvc_data_hash"], data["code"]["git_commit"]) == (champion, dvc_md5, commit)


def _run_gate_sequence(line: str, params: Path, worse: list[str], better: list[str]) -> tuple[dict, dict, dict]:
    name = model_name(line)
    first = retrain(line, str(params))
    assert (first["version"], first["promoted"], first["champion"]) == ("1", True, "1"), first["reasons"]
    assert any("no champion yet" in r for r in first["reasons"])

    second = retrain(line, str(params), worse)
    assert second["version"] == "2" and not second["promoted"]
    assert _worse(second["metrics"], first["metrics"]), (worse, first["metrics"], second["metrics"])
    assert registry.version_for_alias(name, "champion") == "1"
    assert registry.version_for_alias(name, "challenger") == "2"
    tags = registry.get_version(name, "2")["tags"]
    reasons = json.loads(tags["promotion.reasons"])
    assert tags["promotion.decision"] == "rejected" and tags["promotion.champion_before"] == "1"
    assert reasons == second["reasons"] and any(r.endswith(": fail") for r in reasons)
    assert tracking.get_run(second["run_id"])["tags"]["promotion.decision"] == "rejected"

    third = retrain(line, str(params), better)
    assert third["version"] == "3" and third["promoted"], third["reasons"]
    assert not _worse(third["metrics"], first["metrics"])
    assert registry.version_for_alias(name, "champion") == "3"
    assert registry.version_for_alias(name, "challenger") == "3"
    assert [v["version"] for v in registry.list_versions(name)] == ["1", "2", "3"]
    for result in (first, second, third):
        run = tracking.get_run(result["run_id"])
        assert run["status"] == "FINISHED" and run["tags"]["dvc_data_hash"] == result["dvc_data_hash"]
        assert not math.isnan(run["metrics"]["image_auroc"])
        assert run["name"] == f"retrain-{result['line']}-v{result['version']}"  # runs named by line and version
    return first, second, third


def test_retrain_gate_demo(services, tmp_path, capsys):
    """Demo line, 64 px: base (coreset 0.1) -> worse (coreset 0.01) rejected -> better (0.25) promoted.
    The git commit checked is the project checkout's ("none" while it has no commit)."""
    line, root = "demo-fast", tmp_path / "root"
    params = write_params(tmp_path / "params.yaml", root,
                          {line: {"data": small_demo_line(tmp_path / "line"), "max_train_images": 6}})
    with session(params, env_for_clients(services)):
        # zero export tolerances on the second run: float rounding alone (onnxruntime's kernels are not
        # torch's) makes its export differ, so the parity gate refuses it
        first, second, third = _run_gate_sequence(
            line, params, ["detector.patchcore.coreset_ratio=0.01", "export.score_rtol=0", "export.map_rtol=0"],
            ["detector.patchcore.coreset_ratio=0.25"])
        _check_export(services, first, tmp_path)
        _check_export(services, third, tmp_path)
        _check_export_refused(second)
        assert not first["feature_cache_hit"] and second["feature_cache_hit"] and third["feature_cache_hit"]
        assert first["dvc_data_hash"] == second["dvc_data_hash"] == third["dvc_data_hash"]
        assert first["bank_sha256"] != third["bank_sha256"]
        _check_stored_objects(services, third, root, line, tmp_path)
        _check_lineage(services, params, line, root, git_head(PROJECT), "3", tmp_path, capsys)
        _check_inference(services, params, line, tmp_path / "line" / "test", tmp_path)


def _check_export(services, result: dict, tmp: Path) -> None:
    """A registered export: the version's tags point at it, every stored file re-hashes, the downloaded
    folder loads (sha256 checked) and scores; the parity figures are on the run."""
    tags = registry.get_version(result["model_name"], result["version"])["tags"]
    assert result["export"]["status"] == tags["export.status"] == "registered", result["export"]
    assert "openvino" in tags["export.formats"] or "openvino skipped" in tags.get("export.reason", "")
    assert all(_store(services).verify_dir(tags["export.uri"], tags["export.sha256"]).values())
    out = _store(services).get_dir(tags["export.uri"], tmp / f"export-v{result['version']}", tags["export.sha256"])
    for fmt in tags["export.formats"].split(","):
        model = ExportedModel.load(out, fmt)
        assert model.score(np.zeros((2, 3, *model.input_hw), np.float32)).anomaly_maps.shape == (2, *model.input_hw)
    metrics = tracking.get_run(result["run_id"])["metrics"]
    assert metrics["export.passed"] == 1.0 and metrics["export.onnx.decision_agreement"] == 1.0
    assert metrics["export.onnx.score_max_rel_diff"] <= 1e-4 and metrics["export.onnx.n_images"] > 0


def _check_export_refused(result: dict) -> None:
    """Refused by the parity gate: no export on the version, the reason on the version and the run."""
    tags = registry.get_version(result["model_name"], result["version"])["tags"]
    assert result["export"]["status"] == tags["export.status"] == "refused" and "export.uri" not in tags
    assert "differ by up to" in tags["export.reason"], tags["export.reason"]
    run = tracking.get_run(result["run_id"])
    assert run["tags"]["export.reason"] == tags["export.reason"] and run["metrics"]["export.passed"] == 0.0


def _check_inference(services, params: Path, line: str, images: Path, tmp: Path) -> None:
    """Batch scoring with @champion: results in the store (verified), counts logged to an MLflow run."""
    result = inference(line, [str(images)], str(params))
    n = len([p for p in images.rglob("*.png")])
    assert result["version"] == registry.version_for_alias(model_name(line), "champion")
    assert result["counts"]["n_images"] == n == result["counts"]["n_defective"] + result["counts"]["n_good"]
    assert result["results_uri"].startswith(f"s3://{services.bucket}/inference/{line}/")
    out = _store(services).get_dir(result["results_uri"], tmp / "inference", result["results_sha256"])
    rows = (out / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == n + 1 and len(list((out / "overlays").glob("*_overlay.png"))) == n
    run = tracking.get_run(result["run_id"])
    assert run["tags"]["kind"] == "inference" and run["metrics"]["n_images"] == n
    assert run["metrics"]["score_min"] <= run["metrics"]["score_p50"] <= run["metrics"]["score_max"]


@pytest.mark.slow
@pytest.mark.skipif(not COOKIE.is_dir(), reason=f"{COOKIE} not present")
def test_retrain_gate_cookie(services, tmp_path, capsys, monkeypatch):
    """Real data (cookie, 10 train images, 128 px): base -> random backbone weights (worse) rejected ->
    smoothing_sigma 2 (sharper maps: better AUPRO) promoted. The code commit comes from a git repository
    made by the test (DEFECTOPS_CODE_DIR), so the lineage is checked against a real commit."""
    line, root = "cookie", tmp_path / "root"
    commit = tiny_git_repo(tmp_path / "code")
    monkeypatch.setenv("DEFECTOPS_CODE_DIR", str(tmp_path / "code"))
    params = write_params(tmp_path / "params.yaml", root, {line: {"data": COOKIE, "max_train_images": 10}},
                          image_size=128)
    with session(params, env_for_clients(services)):
        first, second, third = _run_gate_sequence(line, params, ["backbone.weights=random"],
                                                  ["detector.patchcore.smoothing_sigma=2.0"])
        assert first["git_commit"] == commit
        _check_export(services, first, tmp_path)  # real data: the parity gate passes
        assert second["bank_sha256"] != first["bank_sha256"] != third["bank_sha256"]
        assert first["dvc_data_hash"] == third["dvc_data_hash"]
        _check_stored_objects(services, first, root, line, tmp_path)
        _check_stored_objects(services, third, root, line, tmp_path)
        _check_lineage(services, params, line, root, commit, "3", tmp_path, capsys)


@pytest.mark.slow
def test_retrain_all_fans_out(services, tmp_path):
    """Two good lines retrain in parallel Dask workers (sharing the DVC registry); a third, whose data folder
    does not exist, fails on its own and makes retrain_all fail after the others finished."""
    data = small_demo_line(tmp_path / "line")
    lines = {"all-a": {"data": data, "max_train_images": 4}, "all-b": {"data": data, "max_train_images": 5},
             "all-broken": {"data": tmp_path / "missing"}}
    params = write_params(tmp_path / "params.yaml", tmp_path / "root", lines)
    with session(params, env_for_clients(services)), pytest.raises(RetrainError) as info:
        run_retrain_all(str(params), workers=2)
    assert "1 of 3 lines failed" in str(info.value) and "all-broken" in str(info.value)
    assert "product line folder not found" in str(info.value)
    tracking.configure(services.mlflow_uri)  # the flows ran in Dask workers, not in this process
    for line, n_train in (("all-a", 4), ("all-b", 5)):
        assert registry.version_for_alias(model_name(line), "champion") == "1"
        out = read_dvc_file(tmp_path / "root" / "data-registry" / "lines" / f"{line}.dvc")
        assert registry.get_version(model_name(line), "1")["tags"]["dvc_data_hash"] == out["md5"]
        assert len(list((tmp_path / "root" / "data-registry" / "lines" / line / "train" / "good").iterdir())) == n_train


@pytest.mark.slow
@pytest.mark.services
def test_demo_command(tmp_path):
    """The README's main job: starts its services, retrains twice, runs inference, prints the lineage and
    the UI addresses, and (with --stop) leaves nothing running."""
    from flows.ops_cli import services_config
    from infra.services import stop

    s3, mlflow, prefect = find_free_ports("127.0.0.1", 3)
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["services"].update(root=str(tmp_path / "root"), s3_port=s3, mlflow_port=mlflow, prefect_port=prefect)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.monotonic()
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "defectops"), "demo", "--stop", "--config", str(params)],
                             cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True,
                             text=True, timeout=900)
    finally:
        from components.config import load_config

        stop(services_config(load_config(params)))  # in case the demo died before its own --stop
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = " ".join(out.stdout.split())
    for expected in ("retrain 1 of 2", "retrain 2 of 2 with detector.patchcore.coreset_ratio=0.02",
                     "inference demo with defectops-demo", "defectops-demo @champion", "VERIFIED against the store",
                     f"MLflow UI http://127.0.0.1:{mlflow}", f"Prefect UI http://127.0.0.1:{prefect}", "services stopped"):
        assert expected in text, expected
    dvc_md5 = read_dvc_file(tmp_path / "root" / "data-registry" / "lines" / "demo.dvc")["md5"]
    assert f"dvc {dvc_md5}" in text
    print(f"defectops demo took {seconds:.0f} s")
