"""flows.lineage against a real MLflow registry and SeaweedFS: the chain of a promoted version, the bank
re-verified against the store at audit time (a changed object is detected), and errors that name the
model and the ref."""

from __future__ import annotations

import json

import boto3
import pytest

from components.config import flatten
from flows import registry, tracking
from flows.lineage import LineageError, lineage, parse_model_ref, render
from flows.promote import apply_gate
from tests.e2e.tiny_line import unique_name, upload, version_tags


@pytest.fixture(scope="module")
def promoted(env, tiny):
    """A version registered from a real run (params, metrics) and promoted by the gate."""
    state, store = env
    bank = upload(store, tiny.model_dir)
    name = unique_name()
    run_id = tracking.start_run("tiny", "lineage")
    tracking.log_params(run_id, tiny.cfg.to_dict())
    metrics = tiny.result.metrics()
    tracking.log_metrics(run_id, metrics)
    tags = version_tags(tiny, eval_data_hash=tiny.fit.split.digest())
    version = registry.register_version(run_id, name, bank, state.s3_endpoint, tags)
    # Latency is not under test here: a loaded 2-core machine can exceed the default 500 ms budget.
    gate = tiny.cfg.promotion.model_copy(update={"latency_budget_ms": 1e6, "max_false_reject_rate": None,
                                                       "max_escape_rate": None})
    decision = apply_gate(name, version, metrics, tags["eval_data_hash"], gate)
    tracking.end_run(run_id)
    return name, version, run_id, bank, tags, decision


@pytest.mark.services
@pytest.mark.slow
def test_lineage_of_the_champion(env, tiny, promoted):
    _, store = env
    name, version, run_id, bank, tags, decision = promoted
    assert decision.promote is True, decision.reasons
    info = lineage(name, "@champion", store)
    assert json.loads(json.dumps(info)) == info  # JSON-exportable as is
    assert (info["version"], info["run"]["run_id"], info["run"]["status"]) == (version, run_id, "FINISHED")
    assert set(info["aliases"]) == {"champion", "challenger"}
    assert info["data"] == {"dvc_data_hash": tags["dvc_data_hash"], "dvc_remote_path": tags["dvc_remote_path"],
                            "eval_data_hash": tiny.fit.split.digest()}
    assert info["code"] == {"git_commit": tags["git_commit"], "git_dirty": "false"}
    assert info["params_hash"] == tiny.cfg.digest()
    expected_params = {k: tracking._text(v) for k, v in flatten(tiny.cfg.to_dict()).items()}
    assert {k: info["params"][k] for k in expected_params} == expected_params
    assert info["weights_sha256"] == tiny.fit.detector.weights_.sha256
    assert info["bank"]["uri"] == bank.uri and info["bank"]["sha256"] == bank.sha256
    assert info["bank"]["verified"] is True and info["bank"]["problem"] is None
    assert set(info["bank"]["files"]) == {p.name for p in tiny.model_dir.iterdir()}
    assert info["metrics"]["image_auroc"] == pytest.approx(tiny.result.metrics()["image_auroc"])
    assert info["promotion"]["decision"] == "promoted" and info["promotion"]["reasons"] == decision.reasons
    assert info["promotion"]["time"] and info["missing_tags"] == []

    assert lineage(name, version, store)["version"] == version  # by number, same version

    text = render(info)
    for needle in (f"{name} @champion", f"version {version}", tags["git_commit"], tags["dvc_data_hash"],
                   tags["dvc_remote_path"], bank.uri, bank.sha256, "VERIFIED", "promoted at",
                   "detector.patchcore.coreset_ratio = 0.25", info["weights_sha256"]):
        assert needle in text, needle


@pytest.mark.services
@pytest.mark.slow
def test_lineage_detects_a_changed_bank_object(env, tiny):
    state, store = env
    bank = upload(store, tiny.model_dir)  # a prefix of its own: other tests' banks stay intact
    name = unique_name()
    run_id = tracking.start_run("tiny", "lineage-tamper")
    version = registry.register_version(run_id, name, bank, state.s3_endpoint, version_tags(tiny))
    tracking.end_run(run_id)
    assert lineage(name, version, store)["bank"]["verified"] is True

    entry = json.loads(store.get_bytes(bank.uri, bank.sha256))["files"]["backbone.safetensors"]
    key = f"{bank.key.rsplit('/', 2)[0]}/{entry['sha256']}/backbone.safetensors"
    raw = boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                       aws_access_key_id=state.access_key, aws_secret_access_key=state.secret_key)
    raw.put_object(Bucket=state.bucket, Key=key, Body=b"swapped weights")

    info = lineage(name, version, store)
    assert info["bank"]["verified"] is False
    assert info["bank"]["files"]["backbone.safetensors"] is False
    assert info["bank"]["files"]["bank.safetensors"] is True
    assert "backbone.safetensors" in info["bank"]["problem"]
    assert "MISMATCH" in render(info) and "VERIFIED" not in render(info)

    raw.delete_object(Bucket=state.bucket, Key=bank.key)  # the manifest itself gone
    info = lineage(name, version, store)
    assert info["bank"]["verified"] is False and "missing" in info["bank"]["problem"]


@pytest.mark.services
@pytest.mark.slow
def test_lineage_errors_name_model_and_ref(env, promoted):
    _, store = env
    name = promoted[0]
    with pytest.raises(LineageError, match=rf"{name} @nope.*no alias @nope"):
        lineage(name, "@nope", store)
    with pytest.raises(LineageError, match=rf"{name} 42.*no version 42"):
        lineage(name, "42", store)
    with pytest.raises(LineageError, match=r"defectops-nosuch @champion.*no such registered model"):
        lineage("defectops-nosuch", "@champion", store)


@pytest.mark.parametrize("text, expected", [
    ("defectops-cookie@champion", ("defectops-cookie", "@champion")),
    ("defectops-cookie@3", ("defectops-cookie", "3")),
    ("defectops-cookie/12", ("defectops-cookie", "12")),
    ("a@b@challenger", ("a@b", "@challenger")),
])
def test_parse_model_ref(text, expected):
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize("text", ["defectops-cookie", "@champion", "defectops-cookie@", "x/"])
def test_parse_model_ref_rejects(text):
    with pytest.raises(LineageError, match="MODEL@ALIAS or MODEL/VERSION"):
        parse_model_ref(text)
