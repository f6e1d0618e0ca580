"""Failure behaviour of the flows against the real services: an object store that is down or refuses the
credentials gives a clear error, the MLflow run is marked FAILED and no alias moves; a bank whose bytes no
longer match its sha256 is refused at load (inference) and reported by the lineage audit.

One line gets a champion first (module fixture), so "no alias moved" is checked against a real champion.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from flows import registry, tracking
from flows.cli import main
from flows.inference import inference
from flows.lineage import lineage
from flows.retrain import RetrainError, model_name, retrain
from flows.tracking import RegistryError
from infra.services import env_for_clients, start, stop
from infra.storage import AccessDeniedError, ChecksumError, EndpointUnreachableError, ObjectStore, parse_uri
from tests.e2e._pipeline import session, small_demo_line, write_params

LINE = "failures"
NAME = model_name(LINE)


@pytest.fixture(scope="module")
def champion_line(services, tmp_path_factory) -> dict:
    """A line with version 1 as @champion; returns its params path and the first retrain's result."""
    tmp = tmp_path_factory.mktemp("failures")
    params = write_params(tmp / "params.yaml", tmp / "root",
                          {LINE: {"data": small_demo_line(tmp / "line"), "max_train_images": 6}})
    with session(params, env_for_clients(services)):
        first = retrain(LINE, str(params))
    assert first["promoted"] and first["champion"] == "1"
    return {"params": params, "first": first, "line_dir": tmp / "line"}


def _latest_run(line: str) -> dict:
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.experiment_name(line))
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return tracking.get_run(runs[0].info.run_id)


def _assert_failed_cleanly(exc: RetrainError, cause: type, step: str) -> None:
    assert isinstance(exc.__cause__, cause), repr(exc.__cause__)
    assert f"retrain {LINE} failed at step '{step}'" in str(exc)
    run = _latest_run(LINE)
    assert run["status"] == "FAILED"
    assert run["tags"]["failed_step"] == step and cause.__name__ in run["tags"]["error"]
    assert [v["version"] for v in registry.list_versions(NAME)] == ["1"]  # nothing registered
    assert registry.version_for_alias(NAME, "champion") == "1"
    assert registry.version_for_alias(NAME, "challenger") == "1"


def test_object_store_down(services, champion_line, isolated_services, capsys):
    """A real SeaweedFS started and stopped again: its endpoint refuses connections."""
    dead_cfg = isolated_services(("seaweedfs",))
    dead = start(dead_cfg)
    stop(dead_cfg)
    env = {**env_for_clients(services), "DEFECTOPS_S3_ENDPOINT": dead.s3_endpoint}
    with session(champion_line["params"], env):
        with pytest.raises(RetrainError) as info:
            retrain(LINE, str(champion_line["params"]), ["detector.patchcore.coreset_ratio=0.2"])
        assert "endpoint unreachable" in str(info.value) and dead.s3_endpoint in str(info.value)
        _assert_failed_cleanly(info.value, EndpointUnreachableError, "check object store")
        capsys.readouterr()
        code = main(["retrain", LINE, "--config", str(champion_line["params"])])
    err = capsys.readouterr().err
    assert code == 1 and "error: retrain failures failed at step 'check object store'" in err
    assert "Traceback" not in err
    assert registry.version_for_alias(NAME, "champion") == "1"


def test_wrong_credentials(services, champion_line):
    env = {**env_for_clients(services), "AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0000"}
    with session(champion_line["params"], env):
        with pytest.raises(RetrainError) as info:
            retrain(LINE, str(champion_line["params"]), ["detector.patchcore.coreset_ratio=0.2"])
    assert "access denied" in str(info.value) and "wrong credentials" in str(info.value)
    assert "not-the-secret-key" not in str(info.value)
    _assert_failed_cleanly(info.value, AccessDeniedError, "check object store")


def test_tampered_bank_is_refused(services, champion_line, tmp_path):
    """Overwrite one file of the champion's bank in the store: inference refuses to load it, the lineage
    audit reports the mismatch. (Runs last: it breaks this line's champion.)"""
    store = ObjectStore(services.s3_endpoint, services.bucket, services.access_key, services.secret_key)
    first = champion_line["first"]
    manifest = store.get_bytes(first["bank_uri"], first["bank_sha256"])
    files = json.loads(manifest)["files"]
    bucket, key = parse_uri(first["bank_uri"])
    base = key.rsplit("/", 2)[0]
    target = f"{base}/{files['bank.safetensors']['sha256']}/bank.safetensors"
    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=services.access_key, aws_secret_access_key=services.secret_key)
    s3.put_object(Bucket=bucket, Key=target, Body=b"not the bank")
    with session(champion_line["params"], env_for_clients(services)):
        with pytest.raises(ChecksumError, match="sha256"):
            inference(LINE, [str(Path(champion_line["line_dir"]) / "test" / "good")], str(champion_line["params"]))
        info = lineage(NAME, "@champion", store)
    assert info["bank"]["verified"] is False and "bank.safetensors" in info["bank"]["problem"]
    assert not list((Path(champion_line["params"]).parent / "root" / "work").glob("inference-*"))


def test_inference_without_champion_is_a_clear_error(services, tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "root", {})
    with session(params, env_for_clients(services)), pytest.raises(RegistryError, match="no such registered model"):
        inference("never-trained", [str(tmp_path)], str(params))
