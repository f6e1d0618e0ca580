"""Stored objects corrupted under intact metadata (issue 16, High): deduplication re-reads the stored bytes
instead of trusting the `sha256` metadata, the retrain's candidate check loads the model through the path
serving uses and repairs a corrupt shared object from the local copy (or fails naming it), and a retrain
after such a corruption promotes only a model that loads.
"""

from __future__ import annotations

import json
import shutil

import boto3
import pytest

from flows.candidate_check import CandidateCheckError, check_candidate
from flows.pyfunc_model import fetch_detector
from infra.storage import ChecksumError, parse_uri
from tests.e2e.tiny_line import unique_name
from tests.reliability.invariants import check, snapshot


def _s3(state):
    return boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=state.access_key, aws_secret_access_key=state.secret_key)


def flip_keeping_metadata(state, uri_or_key: str, index: int | None = None) -> bytes:
    """Flip one bit of the object in place and write its original `sha256` metadata back; -> original bytes."""
    key = parse_uri(uri_or_key)[1] if uri_or_key.startswith("s3://") else uri_or_key
    s3 = _s3(state)
    head = s3.head_object(Bucket=state.bucket, Key=key)
    data = bytearray(s3.get_object(Bucket=state.bucket, Key=key)["Body"].read())
    data[(len(data) // 2 if index is None else index) % len(data)] ^= 0x10
    s3.put_object(Bucket=state.bucket, Key=key, Body=bytes(data), Metadata=head["Metadata"])
    after = s3.head_object(Bucket=state.bucket, Key=key)
    assert after["Metadata"] == head["Metadata"] and after["ContentLength"] == head["ContentLength"]
    return bytes(data)


def _keys(store, obj) -> dict[str, str]:
    """relative path -> object key of every file of a stored directory (the manifest as MANIFEST.json)."""
    _, manifest_key = parse_uri(obj.uri)
    base = manifest_key.rsplit("/", 2)[0]
    files = json.loads(store.get_bytes(obj.uri, obj.sha256))["files"]
    return {"MANIFEST.json": manifest_key, **{rel: f"{base}/{e['sha256']}/{rel}" for rel, e in files.items()}}


def test_upload_repairs_a_bit_flip_under_intact_metadata(tiny, store, object_store, record):
    prefix = f"models/{unique_name('t')}"
    obj = store.put_dir(tiny.model_dir, prefix)
    keys = _keys(store, obj)
    for key in keys.values():
        flip_keeping_metadata(object_store, key)
    with pytest.raises(ChecksumError):  # the manifest itself was flipped too
        store.verify_dir(obj.uri, obj.sha256)
    store.repaired.clear()
    again = store.put_dir(tiny.model_dir, prefix)
    record("security", f"bit flip under intact sha256 metadata in each of {len(keys)} objects: re-uploaded")
    assert again == obj
    assert sorted(store.repaired) == sorted(keys.values())
    assert all(store.verify_dir(obj.uri, obj.sha256).values())


def test_candidate_check_repairs_from_the_local_copy_or_names_the_object(tiny, store, object_store, tmp_path,
                                                                         monkeypatch, record):
    from infra.services import env_for_clients

    for key, value in env_for_clients(object_store).items():
        monkeypatch.setenv(key, value)
    prefix = ["models", unique_name("t")]
    obj = store.put_dir(tiny.model_dir, prefix)
    bank = {"uri": obj.uri, "sha256": obj.sha256}
    backbone = _keys(store, obj)["backbone.safetensors"]
    flip_keeping_metadata(object_store, backbone)
    with pytest.raises(ChecksumError):  # serving's path refuses it ...
        fetch_detector({"bank_uri": obj.uri, "bank_sha256": obj.sha256}, tmp_path / "serving")
    report = check_candidate(bank, tiny.model_dir, tiny.root, tmp_path / "c1", prefix, store)  # ... the check repairs
    assert report["repaired"] == [backbone] and report["scored"] >= 1 and report["max_abs_diff"] == 0
    assert all(store.verify_dir(obj.uri, obj.sha256).values())

    flip_keeping_metadata(object_store, backbone)
    other = tmp_path / "other"
    shutil.copytree(tiny.model_dir, other)
    (other / "extra.txt").write_text("not the uploaded model")  # a different folder cannot repair it
    with pytest.raises(CandidateCheckError, match=backbone.replace(".", r"\.")):
        check_candidate(bank, other, tiny.root, tmp_path / "c2", prefix, store)
    flip_keeping_metadata(object_store, backbone)  # (the upload above replaced it: same content, same key)
    with pytest.raises(CandidateCheckError, match="local copy .* is gone"):
        check_candidate(bank, tmp_path / "gone", tiny.root, tmp_path / "c3", prefix, store)
    store.put_dir(tiny.model_dir, prefix)
    record("security", "candidate check: corrupt shared object repaired from the local copy, else named")
    assert all(store.verify_dir(obj.uri, obj.sha256).values())


@pytest.mark.slow
def test_retrain_after_a_metadata_intact_bit_flip_promotes_only_a_loadable_model(services, tmp_path, record):
    """The probe's case: flip a byte of the shared backbone object (metadata kept), retrain with tolerances
    that let it promote: the retrain repairs the object, the champion (new and old) loads and scores."""
    from flows.retrain import model_name, retrain
    from infra.services import env_for_clients
    from tests.e2e._pipeline import session, small_demo_line, write_params

    line = "flipped"
    params = write_params(tmp_path / "params.yaml", tmp_path / "root",
                          {line: {"data": small_demo_line(tmp_path / "line"), "max_train_images": 6}})
    env, name = env_for_clients(services), model_name(line)
    with session(params, env):
        first = retrain(line, str(params))
        store_keys = [k for k in snapshot(services, deep=False) if k.startswith(f"models/{line}/")]
        backbone = next(k for k in store_keys if k.endswith("/backbone.safetensors"))
        flip_keeping_metadata(services, backbone)
        before = snapshot(services)
        second = retrain(line, str(params), ["promotion.image_auroc_tolerance=1", "promotion.aupro_tolerance=1"])
        report = check(services, name)
        for version in ("1", second["version"]):

            from flows import registry
            tags = registry.get_version(name, version)["tags"]
            fetch_detector({"bank_uri": tags["bank_uri"], "bank_sha256": tags["bank_sha256"]},
                           tmp_path / f"serve-v{version}")
    record("fault", "bit flip under intact metadata in the shared backbone object, then retrain",
           corrupted=len(report.changed) + len(report.problems))
    assert first["promoted"] and second["promoted"]
    assert report.ok, report.problems
    assert before[backbone] != snapshot(services)[backbone]  # the corrupt bytes were replaced
