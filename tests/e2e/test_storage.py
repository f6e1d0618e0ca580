"""infra.storage.ObjectStore against a real SeaweedFS (no mocks)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import boto3
import pytest

from infra.process import find_free_ports
from infra.storage import (
    MANIFEST_NAME,
    AccessDeniedError,
    BucketNotFoundError,
    ChecksumError,
    EndpointUnreachableError,
    InvalidKeyError,
    ManifestError,
    ObjectStore,
    StorageError,
    parse_uri,
)

pytestmark = pytest.mark.services


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _raw(state):
    return boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=state.access_key, aws_secret_access_key=state.secret_key)


def _uploads(caplog) -> int:
    return sum(r.getMessage().startswith("uploaded ") for r in caplog.records if r.name == "infra.storage")


def test_put_get_round_trip(store, object_store, tmp_path):
    data = os.urandom(100_000)
    obj = store.put_file(_file(tmp_path / "bank.safetensors", data), "banks/cookie")
    sha = hashlib.sha256(data).hexdigest()
    assert (obj.sha256, obj.size) == (sha, len(data))
    assert obj.key == f"banks/cookie/{sha}/bank.safetensors"
    assert obj.uri == f"s3://{object_store.bucket}/{obj.key}" and parse_uri(obj.uri) == (object_store.bucket, obj.key)
    head = _raw(object_store).head_object(Bucket=object_store.bucket, Key=obj.key)
    assert head["Metadata"]["sha256"] == sha
    out = store.get_file(obj.uri, tmp_path / "out" / "bank.safetensors", obj.sha256)
    assert out.read_bytes() == data
    assert sorted(p.name for p in out.parent.iterdir()) == ["bank.safetensors"]  # no temp file left
    assert store.exists(obj.uri) and store.verify(obj.uri, sha)
    assert not store.exists(obj.uri + ".missing")


def test_same_content_is_uploaded_once(store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="infra.storage")
    data = os.urandom(5000)
    first = store.put_file(_file(tmp_path / "a" / "w.bin", data), "dedup")
    second = store.put_file(_file(tmp_path / "b" / "w.bin", data), "dedup")
    assert first == second and _uploads(caplog) == 1
    other = store.put_file(_file(tmp_path / "c" / "w.bin", data + b"!"), "dedup")
    assert other.key != first.key and _uploads(caplog) == 2


def test_multipart_upload_and_download(object_store, tmp_path):
    store = ObjectStore(object_store.s3_endpoint, object_store.bucket, object_store.access_key,
                        object_store.secret_key, multipart_threshold=5 * 2**20)
    data = os.urandom(12 * 2**20)
    obj = store.put_file(_file(tmp_path / "big.bin", data), "big")
    etag = _raw(object_store).head_object(Bucket=object_store.bucket, Key=obj.key)["ETag"]
    assert etag.strip('"').endswith("-3")  # 3 parts of 5 MiB
    assert store.get_file(obj.uri, tmp_path / "back.bin", obj.sha256).read_bytes() == data


def test_put_dir_get_dir(store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="infra.storage")
    model = tmp_path / "model"
    files = {"weights.safetensors": os.urandom(3000), "meta.json": b'{"k": 1}',
             "index/bank.faiss": os.urandom(2000), "index/copy.json": b'{"k": 1}'}
    for rel, data in files.items():
        _file(model / rel, data)
    manifest = store.put_dir(model, "models/cookie")
    assert manifest.key.endswith(f"/{manifest.sha256}/{MANIFEST_NAME}")
    listed = json.loads(store.get_bytes(manifest.uri, manifest.sha256))["files"]
    assert listed == {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in files.items()}

    dest = tmp_path / "cache" / "model"
    store.get_dir(manifest.uri, dest, manifest.sha256)
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]
    with pytest.raises(FileExistsError, match="already exists"):
        store.get_dir(manifest.uri, dest, manifest.sha256)

    # Same content -> same address, nothing re-uploaded; one changed file -> new address, one new blob.
    uploads = _uploads(caplog)
    assert store.put_dir(model, "models/cookie") == manifest and _uploads(caplog) == uploads
    (model / "meta.json").write_bytes(b'{"k": 2}')
    changed = store.put_dir(model, "models/cookie")
    assert changed.sha256 != manifest.sha256 and _uploads(caplog) == uploads + 2  # the file + the manifest
    store.get_dir(changed.uri, dest, changed.sha256, overwrite=True)
    assert (dest / "meta.json").read_bytes() == b'{"k": 2}'


def test_get_dir_with_wrong_digest_writes_nothing(store, tmp_path):
    manifest = store.put_dir(_file(tmp_path / "m" / "f.bin", os.urandom(100)).parent, "models/x")
    with pytest.raises(ChecksumError):
        store.get_dir(manifest.uri, tmp_path / "dest", "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_corrupted_object_is_detected_and_dest_untouched(store, object_store, tmp_path):
    obj = store.put_file(_file(tmp_path / "w.bin", b"original weights"), "corrupt")
    _raw(object_store).put_object(Bucket=object_store.bucket, Key=obj.key, Body=b"tampered weights",
                                  Metadata={"sha256": obj.sha256})
    dest = _file(tmp_path / "dest" / "w.bin", b"previous good copy")
    with pytest.raises(ChecksumError, match=rf"expected {obj.sha256}") as info:
        store.get_file(obj.uri, dest, obj.sha256)
    assert obj.key in str(info.value) and object_store.s3_endpoint in str(info.value)
    assert dest.read_bytes() == b"previous good copy"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["w.bin"]
    assert store.verify(obj.uri, obj.sha256) is False
    fresh = tmp_path / "fresh" / "w.bin"
    with pytest.raises(ChecksumError):
        store.get_file(obj.uri, fresh, obj.sha256)
    assert not fresh.exists() and list(fresh.parent.iterdir()) == []
    store.delete(obj.key)  # the services are shared by the session: later invariant checks see every object


def test_bytes_round_trip_and_checksum(store):
    obj = store.put_bytes(b"image,score\na.png,0.5\n", "results/cookie", "scores.csv")
    assert store.get_bytes(obj.uri, obj.sha256) == b"image,score\na.png,0.5\n"
    with pytest.raises(ChecksumError):
        store.get_bytes(obj.uri, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.get_bytes(obj.uri, "abc")


@pytest.mark.parametrize("prefix", ["../x", "a/../b", ["a/b"], "", "a//b", "a b", "./a", ["ok", ".."]])
def test_invalid_prefix_is_refused(store, tmp_path, prefix):
    src = _file(tmp_path / "f.txt", b"x")
    with pytest.raises(InvalidKeyError, match="must match"):
        store.put_file(src, prefix)
    with pytest.raises(ValueError):  # also a ValueError, for callers that validate input
        store.put_bytes(b"x", prefix, "f.txt")


def test_invalid_filename_is_refused(store, tmp_path):
    with pytest.raises(InvalidKeyError, match="'my file.txt'"):
        store.put_file(_file(tmp_path / "my file.txt", b"x"), "ok")


def test_missing_bucket_is_a_storage_error(object_store, tmp_path):
    store = ObjectStore(object_store.s3_endpoint, "no-such-bucket", object_store.access_key,
                        object_store.secret_key)
    src = _file(tmp_path / "f.txt", b"x")
    sha = hashlib.sha256(b"x").hexdigest()
    for call in (lambda: store.put_file(src, "p"), lambda: store.exists("s3://no-such-bucket/p/f.txt"),
                 lambda: store.get_file(f"s3://no-such-bucket/p/{sha}/f.txt", tmp_path / "o", sha)):
        with pytest.raises(BucketNotFoundError, match="s3://no-such-bucket/.*bucket does not exist"):
            call()
    assert not (tmp_path / "o").exists()


def test_wrong_key_is_a_storage_error(object_store, store, tmp_path):
    obj = store.put_bytes(b"secret-free data", "wrongkey", "d.txt")
    bad = ObjectStore(object_store.s3_endpoint, object_store.bucket, object_store.access_key, "not-the-key")
    for call in (lambda: bad.get_bytes(obj.uri, obj.sha256), lambda: bad.exists(obj.uri),
                 lambda: bad.get_file(obj.uri, tmp_path / "o", obj.sha256)):
        with pytest.raises(AccessDeniedError, match="access denied") as info:
            call()
        assert "not-the-key" not in str(info.value) and object_store.secret_key not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_nothing_listening_is_a_quick_storage_error(object_store):
    endpoint = f"http://127.0.0.1:{find_free_ports('127.0.0.1', 1)[0]}"
    store = ObjectStore(endpoint, object_store.bucket, object_store.access_key, object_store.secret_key,
                        max_attempts=2)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=rf"^s3://{object_store.bucket}/down/.* at {endpoint}: "
                       r"head: endpoint unreachable \(EndpointConnectionError\)$"):
        store.put_bytes(b"x", "down", "x.txt")
    with pytest.raises(StorageError):
        store.get_bytes(f"s3://{object_store.bucket}/down/x.txt", "0" * 64)
    assert time.monotonic() - t0 < 10  # 2 attempts each, backoff under 2 s


def test_from_env(object_store):
    env = {"DEFECTOPS_S3_ENDPOINT": object_store.s3_endpoint, "DEFECTOPS_BUCKET": object_store.bucket,
           "DEFECTOPS_S3_ACCESS_KEY": object_store.access_key, "DEFECTOPS_S3_SECRET_KEY": object_store.secret_key}
    store = ObjectStore.from_env(env)
    assert store.exists(store.put_bytes(b"env", "env", "e.txt").uri)
    assert object_store.secret_key not in repr(store)
    with pytest.raises(ValueError, match="DEFECTOPS_BUCKET"):
        ObjectStore.from_env({k: v for k, v in env.items() if k != "DEFECTOPS_BUCKET"})


def test_verify_dir_names_the_changed_file(store, object_store, tmp_path):
    model = tmp_path / "vd"
    _file(model / "bank.bin", os.urandom(500))
    _file(model / "meta.json", b'{"k": 1}')
    manifest = store.put_dir(model, "models/verify")
    assert store.verify_dir(manifest.uri, manifest.sha256) == {"bank.bin": True, "meta.json": True}
    bank_key = f"models/verify/{hashlib.sha256((model / 'bank.bin').read_bytes()).hexdigest()}/bank.bin"
    _raw(object_store).put_object(Bucket=object_store.bucket, Key=bank_key, Body=b"flipped")
    assert store.verify_dir(manifest.uri, manifest.sha256) == {"bank.bin": False, "meta.json": True}
    with pytest.raises(ChecksumError):
        store.verify_dir(manifest.uri, "0" * 64)
    _raw(object_store).put_object(Bucket=object_store.bucket, Key=manifest.key, Body=b"not json")
    with pytest.raises(ManifestError):
        store.verify_dir(manifest.uri, hashlib.sha256(b"not json").hexdigest())
