"""flows.tracking and the registered pyfunc against a real MLflow server and SeaweedFS (conftest's shared
root): run logging, evaluation artifacts, registration tags, no credentials anywhere, predict, and a bank
whose bytes changed in the store refused at load."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import load_config
from flows import registry, tracking
from infra.storage import ChecksumError
from tests.e2e.tiny_line import unique_name, upload, version_tags

E2E = (pytest.mark.services, pytest.mark.slow)


def e2e(test):
    for mark in E2E:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def registered(env, tiny):
    """One version of a fresh model, registered from a real run."""
    state, store = env
    bank = upload(store, tiny.model_dir)
    run_id = tracking.start_run("tiny", "register", {"git_commit": "abc"})
    tracking.log_params(run_id, tiny.cfg.to_dict())
    tracking.log_metrics(run_id, tiny.result.metrics())
    name = unique_name()
    version = registry.register_version(run_id, name, bank, state.s3_endpoint, version_tags(tiny))
    tracking.end_run(run_id)
    return name, version, run_id, bank


def _secrets(state) -> list[str]:
    return [state.access_key, state.secret_key]


@e2e
def test_run_logging_and_evaluation_artifacts(env, tiny, tmp_path):
    run_id = tracking.start_run("tiny", "evaluate", {"flow_run": "local"})
    tracking.log_params(run_id, tiny.cfg.to_dict())
    tracking.log_metrics(run_id, tiny.result.metrics())
    written = tracking.log_evaluation(run_id, tiny.result, tiny.fit.detector.threshold_, tmp_path / "eval", 3,
                                      split=tiny.fit.split, data=tiny.cfg.data)
    tracking.end_run(run_id)

    run = tracking.get_run(run_id)
    assert run["status"] == "FINISHED" and run["experiment"] == "defectops/tiny"
    assert run["params"]["detector.patchcore.coreset_ratio"] == "0.25"
    assert run["params"]["data.image_size"] == "[64, 64]"
    assert run["metrics"]["image_auroc"] == pytest.approx(tiny.result.metrics()["image_auroc"])
    assert run["tags"]["product_line"] == "tiny"

    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/roc_curve.png", "evaluation/pro_curve.png", "evaluation/metrics.json",
            "evaluation/scores.csv", "evaluation/worst_misses"} <= names
    overlays = client.list_artifacts(run_id, "evaluation/worst_misses")
    assert len(overlays) == 3 and all(a.file_size > 0 for a in overlays)
    fetched = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation",
                                                       dst_path=str(tmp_path / "dl")))
    for png in ("roc_curve.png", "pro_curve.png"):
        with Image.open(fetched / png) as im:
            assert im.format == "PNG" and min(im.size) >= 300
    with Image.open(next((fetched / "worst_misses").iterdir())) as im:
        assert im.size == (64, 64)
    report = json.loads((fetched / "metrics.json").read_text())
    assert report["report"]["overall"]["aupro"] == pytest.approx(tiny.result.report.overall["aupro"])
    assert report["threshold"]["image"] == pytest.approx(tiny.fit.detector.threshold_.image)
    assert {p.name for p in written} >= {"roc_curve.png", "pro_curve.png", "metrics.json"}


@e2e
def test_credentials_are_refused_in_params_and_tags(env):
    state, _ = env
    run_id = tracking.start_run("tiny", "leak")
    with pytest.raises(tracking.CredentialLeakError, match="secret_key") as info:
        tracking.log_params(run_id, {"services": {"secret_key": "abc123"}})
    assert "abc123" not in str(info.value)
    with pytest.raises(tracking.CredentialLeakError, match="'note'") as info:
        tracking.set_run_tags(run_id, {"note": f"endpoint with {os.environ['AWS_SECRET_ACCESS_KEY']}"})
    assert state.secret_key not in str(info.value)
    tracking.end_run(run_id, "FAILED")
    run = tracking.get_run(run_id)
    assert run["status"] == "FAILED" and not run["params"] and "note" not in run["tags"]


@e2e
def test_version_tags_and_no_credentials_anywhere(env, tiny, registered, tmp_path):
    state, _ = env
    name, version, run_id, bank = registered
    info = registry.get_version(name, version)
    assert info["run_id"] == run_id and info["version"] == version
    tags = info["tags"]
    assert set(registry.REQUIRED_VERSION_TAGS) <= set(tags)
    assert tags["bank_uri"] == bank.uri and tags["bank_sha256"] == bank.sha256
    assert float(tags["metrics.image_auroc"]) == pytest.approx(tiny.result.metrics()["image_auroc"])
    assert float(tags["metrics.ms_per_image"]) == pytest.approx(tiny.result.ms_per_image)
    assert tags["git_dirty"] == "false" and tags["method"] == "patchcore"
    assert "metrics.spot.aupro" in tags

    # Nothing secret in the run, the version, or the logged model's files (MLmodel holds model_config).
    run = tracking.get_run(run_id)
    model_dir = Path(mlflow.artifacts.download_artifacts(registry.model_uri(name, version), dst_path=str(tmp_path)))
    texts = [json.dumps(run["params"]), json.dumps(run["tags"]), json.dumps(tags)]
    texts += [p.read_text(errors="replace") for p in model_dir.rglob("*") if p.is_file()]
    mlmodel = (model_dir / "MLmodel").read_text()
    assert bank.uri in mlmodel and state.s3_endpoint not in mlmodel  # the endpoint comes from the loader's env
    assert tags["bank_endpoint"] == state.s3_endpoint
    for secret in _secrets(state):
        assert not any(secret in text for text in texts)


@e2e
def test_register_version_requires_lineage_tags(env, tiny):
    state, store = env
    run_id = tracking.start_run("tiny", "incomplete")
    tags = version_tags(tiny)
    del tags["dvc_data_hash"]
    name = unique_name()
    with pytest.raises(ValueError, match=r"dvc_data_hash"):
        registry.register_version(run_id, name, upload(store, tiny.model_dir), state.s3_endpoint, tags)
    tracking.end_run(run_id, "FAILED")
    assert registry.version_for_alias(name, "champion") is None
    assert registry.list_versions(name) == []


@e2e
def test_pyfunc_predict_reproduces_the_evaluation_scores(env, tiny, registered):
    name, version, _, _ = registered
    registry.set_alias(name, "challenger", version)
    model = registry.load_pyfunc(name, "@challenger")
    paths = [str(s.path) for s in tiny.fit.split.test]
    out = model.predict(pd.DataFrame({"image_path": paths}))
    assert list(out.columns) == ["image_path", "image_sha256", "score", "normalised_score", "decision",
                                 "threshold", "heatmap"]
    assert out["image_path"].tolist() == paths
    expected = np.array([r.score for r in tiny.result.records])  # evaluate_split keeps split.test order
    np.testing.assert_allclose(out["score"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    threshold = tiny.fit.detector.threshold_.image
    np.testing.assert_allclose(out["threshold"].to_numpy(), threshold, rtol=1e-6)
    assert out["decision"].tolist() == ["defective" if s > threshold else "good" for s in out["score"]]


@e2e
def test_tampered_bank_is_refused_at_load(env, tiny, tmp_path):
    state, store = env
    bank = upload(store, tiny.model_dir)
    run_id = tracking.start_run("tiny", "tamper")
    name = unique_name()
    version = registry.register_version(run_id, name, bank, state.s3_endpoint, version_tags(tiny))
    assert tracking.get_run(run_id)["status"] == "RUNNING"  # logging the model did not end the run
    tracking.end_run(run_id)
    registry.load_version(name, version, tmp_path / "ok")  # intact: loads

    manifest = json.loads(store.get_bytes(bank.uri, bank.sha256))
    entry = manifest["files"]["bank.safetensors"]
    key = f"{bank.key.rsplit('/', 2)[0]}/{entry['sha256']}/bank.safetensors"
    raw = boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                       aws_access_key_id=state.access_key, aws_secret_access_key=state.secret_key)
    raw.put_object(Bucket=state.bucket, Key=key, Body=b"not the bank", Metadata={"sha256": entry["sha256"]})

    with pytest.raises(ChecksumError, match="sha256"):
        registry.load_pyfunc(name, version)
    with pytest.raises(ChecksumError, match=r"bank\.safetensors"):
        registry.load_version(name, version, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@e2e
def test_lookup_errors_name_the_model_and_the_ref(env, registered):
    name, version, _, _ = registered
    with pytest.raises(tracking.RegistryError, match=rf"{name} @nope: no alias @nope"):
        registry.get_version(name, "@nope")
    with pytest.raises(tracking.RegistryError, match=rf"{name} 999: no version 999"):
        registry.get_version(name, "999")
    with pytest.raises(tracking.RegistryError, match=r"defectops-missing-xyz @champion: no such registered model"):
        registry.get_version("defectops-missing-xyz", "@champion")
    with pytest.raises(tracking.RegistryError, match="'champion'"):
        registry.get_version(name, "champion")
    assert registry.version_for_alias("defectops-missing-xyz", "champion") is None
    assert registry.get_version(name, f"@{version}")["version"] == version  # "@3" means version 3


# ------------------------------------------------------------------ no services: the credential filter
@pytest.mark.parametrize("key", ["secret_key", "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "api_key",
                                 "auth_token", "token", "password", "s3.credentials"])
def test_credential_shaped_names_are_refused(key):
    with pytest.raises(tracking.CredentialLeakError, match=re.escape(key)):
        tracking.checked({key: "value"}, "params")


def test_every_real_parameter_passes_the_filter(monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    cfg = load_config(Path(__file__).parents[2] / "params.yaml")
    flat = tracking.checked(cfg.to_dict(), "params")
    assert "detector.patchcore.coreset_ratio" in flat and "services.bucket" in flat


def test_values_holding_a_live_credential_are_refused(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    assert tracking.checked({"endpoint": "http://127.0.0.1:8333"}, "tags") == {"endpoint": "http://127.0.0.1:8333"}
    with pytest.raises(tracking.CredentialLeakError, match="'uri'") as info:
        tracking.checked({"uri": "s3://x?key=s3cr3t-value-123"}, "tags")
    assert "s3cr3t" not in str(info.value)
