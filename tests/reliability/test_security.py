"""Security: no pickle is ever loaded (planted payloads are refused without running), object keys come only
from validated names, credentials never reach MLflow, Prefect, logs, the store or the repository, the local
services listen on 127.0.0.1 only and SeaweedFS refuses unsigned requests, and a flipped bit anywhere in a
stored model is detected.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import psutil
import pytest
import torch
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig

from components.backbones import WeightsError, read_state_dict
from components.config import ConfigError, validate
from components.detector import ArtifactError, load_detector
from flows import registry, tracking
from flows.feature_cache import cached_features_sha256, write_cached_features
from flows.pyfunc_model import fetch_detector
from flows.steps import line_config
from infra.storage import AccessDeniedError, ChecksumError, InvalidKeyError, ObjectStore, parse_uri
from tests.reliability.invariants import snapshot

PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "flows", "infra")


# ------------------------------------------------------------------------------------------------ pickle
class Payload:
    """Unpickling this runs Path(marker).touch(): the marker file proves whether a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (PROJECT / pkg).rglob("*.py"))


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """torch.load without weights_only=True, numpy load with allow_pickle=True, pickle-family calls."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in
                      ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal")]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kwargs:
            ok = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
            if not ok:
                found.append(f"{name}(...) line {node.lineno} without weights_only=True")
        if "allow_pickle" in kwargs and not (isinstance(kwargs["allow_pickle"], ast.Constant)
                                             and kwargs["allow_pickle"].value is False):
            found.append(f"{name}(allow_pickle=...) line {node.lineno}")
        if name.endswith(("read_pickle", "to_pickle", "pickle.load", "pickle.loads")):
            found.append(f"{name} line {node.lineno}")
        model = kwargs.get("python_model")
        if name.endswith("log_model") and isinstance(model, ast.Call) and ast.unparse(model.func) != "str":
            found.append(f"{name}(python_model=<object>) line {node.lineno}: cloudpickled")
    return found


def test_package_never_unpickles(record):
    files = _python_files()
    problems = {str(p.relative_to(PROJECT)): bad for p in files if (bad := _unsafe_calls(ast.parse(p.read_text())))}
    record("security", f"static scan: no pickle / torch.load without weights_only ({len(files)} modules)")
    assert len(files) > 30 and not problems, problems
    # the scanner itself finds what it is meant to find
    planted = ast.parse("import pickle\nimport torch\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n"
                        "mlflow.pyfunc.log_model(python_model=Model())\nlog_model(python_model=str(p))\n")
    assert len(_unsafe_calls(planted)) == 4


def test_planted_pickle_weights_file_is_refused(tmp_path, record):
    marker = tmp_path / "pwned"
    path = tmp_path / "backbone.pth"
    torch.save({"conv.weight": torch.zeros(1), "evil": Payload(marker)}, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    record("security", "planted pickle in a .pth weights file")
    assert str(path) in str(info.value) and not marker.exists()


def _plant_pickle_bank(model_dir: Path, marker: Path) -> Path:
    """A copy of a saved model whose bank.safetensors is a pickle payload, with a consistent manifest (as an
    attacker with write access to the store would make it)."""
    from components.detector import sha256_file

    bad = model_dir.parent / "planted-model"
    shutil.copytree(model_dir, bad)
    (bad / "bank.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["bank.safetensors"] = {"sha256": sha256_file(bad / "bank.safetensors"),
                                            "size": (bad / "bank.safetensors").stat().st_size}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_planted_pickle_in_the_object_store_is_refused(tiny, store, object_store, tmp_path, record):
    """The store and the manifests are consistent (the attacker re-hashed everything): the bytes still go
    only to safetensors, which refuses them as a clear ArtifactError; the payload never runs."""
    marker = tmp_path / "pwned"
    planted = _plant_pickle_bank(tiny.model_dir, marker)
    obj = store.put_dir(planted, ["security", "planted"])
    with pytest.raises(ArtifactError) as info:
        fetch_detector({"bank_uri": obj.uri, "bank_sha256": obj.sha256}, tmp_path / "fetched",
                       env={**os.environ, "DEFECTOPS_S3_ENDPOINT": store.endpoint_url,
                            "AWS_ACCESS_KEY_ID": object_store.access_key,
                            "AWS_SECRET_ACCESS_KEY": object_store.secret_key})
    record("security", "planted pickle as a bank in the object store")
    assert "bank.safetensors" in str(info.value) and not marker.exists()


def test_planted_pickle_model_in_the_registry_is_refused(env, tmp_path, record):
    """A cloudpickled pyfunc registered under a defectops name: load_pyfunc refuses it before MLflow would
    unpickle it (the payload would touch the marker)."""
    import mlflow
    from mlflow.pyfunc import PythonModel

    from tests.e2e.tiny_line import unique_name

    marker = tmp_path / "pwned"

    class Evil(PythonModel):
        def __reduce__(self):
            return (Path.touch, (marker,))

        def predict(self, context, model_input, params=None):
            return model_input

    name = unique_name("defectops-planted-")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Evil(), pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, name).version
    with pytest.raises(registry.UnsafeModelError) as refused:
        registry.load_pyfunc(name, str(version))
    record("security", "planted cloudpickle model in the MLflow registry")
    assert "refusing to load" in str(refused.value) and not marker.exists()


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("line", ["../../x", "a/b", "..", "x/../../y", "/abs"])
def test_unsafe_line_names_are_refused(line, tmp_path, record):
    with pytest.raises(ConfigError, match="product line name"):
        validate({"lines": {line: {"data": str(tmp_path)}}})
    params = tmp_path / "params.yaml"  # the unsafe name *is* a line of the file: refused as a name, not unknown
    params.write_text(json.dumps({"lines": {line: {"data": str(tmp_path)}}}))
    with pytest.raises(ConfigError, match="product line name"):
        line_config(params, line)
    model = tmp_path / "m"
    model.mkdir()
    (model / "bank.safetensors").write_bytes(b"x")
    store = ObjectStore("http://127.0.0.1:9", "bucket", "k", "s")  # never contacted: refused first
    with pytest.raises(InvalidKeyError):
        store.put_dir(model, ["models", line])
    record("security", f"line name {line!r} refused at config load and key building")


# ------------------------------------------------------------------------------------------------ credentials
def _secrets(state) -> list[bytes]:
    from infra.credentials import service_secrets

    return [state.access_key.encode(), state.secret_key.encode(),
            *(value.encode() for value in service_secrets(state.root).values())]


def _files_with_secrets(root: Path, secrets: list[bytes], allowed: set[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink() or path.name in allowed or path.stat().st_size > 256 << 20:
            continue
        data = path.read_bytes()
        if any(s in data for s in secrets):
            hits.append(str(path.relative_to(root)))
    return hits


def test_credentials_never_in_mlflow_prefect_logs_or_store(services, champion_line, record):
    secrets = _secrets(services)
    assert all(len(s) >= 16 for s in secrets)
    tracking.configure(services.mlflow_uri)
    client = tracking.client()
    leaks = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=500):
            text = json.dumps({"p": run.data.params, "t": run.data.tags}).encode()
            leaks += [f"run {run.info.run_id}" for s in secrets if s in text]
    for info in registry.list_versions(champion_line["name"]):
        leaks += [f"version {info['version']}" for s in secrets if s in json.dumps(info["tags"]).encode()]
    # Service state and logs (SQLite databases of MLflow and Prefect included), except the two key files.
    leaks += _files_with_secrets(services.root, secrets, {"credentials.json", "s3.json", "service-secrets.json",
                                                          "security.toml", "auth.ini"})
    # The clients' root: DVC data registry, feature cache, work folders; `.dvc/config.local` is the
    # credentials file DVC reads (0600, git-ignored), checked separately below.
    leaks += _files_with_secrets(champion_line["root"], secrets, {"config.local"})
    objects = snapshot(services)
    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=services.access_key, aws_secret_access_key=services.secret_key)
    for key in objects:
        body = s3.get_object(Bucket=services.bucket, Key=key)["Body"].read()
        leaks += [f"object {key}" for s in secrets if s in body]
    data_registry = champion_line["root"] / "data-registry"
    local = data_registry / ".dvc" / "config.local"
    history = subprocess.run(["git", "-C", str(data_registry), "log", "--all", "-p"], capture_output=True).stdout
    tracked = subprocess.run(["git", "-C", str(data_registry), "ls-files"], capture_output=True, text=True).stdout
    record("security", f"credentials absent from MLflow, Prefect, service logs and {len(objects)} stored objects")
    assert not leaks, leaks
    assert not any(s in history for s in secrets) and ".dvc/config.local" not in tracked.split()
    assert local.stat().st_mode & 0o077 == 0
    assert (services.root / "credentials.json").stat().st_mode & 0o077 == 0


_SECRET_PATTERNS = (
    re.compile(rb"AKIA[0-9A-Z]{16}"),  # AWS access key ids
    re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(rb"(?i)(secret_access_key|secret_key|admin_password|auth_string)\s*[=:]\s*[\"']?[A-Za-z0-9/+_\-]{20,}"),
)


def _local_secrets() -> list[bytes]:
    """The keys of this checkout's own services (`.defectops/`), when it has run them."""
    found = []
    for name in ("credentials.json", "service-secrets.json"):
        path = PROJECT / ".defectops" / name
        if path.is_file():
            found += [str(v).encode() for v in json.loads(path.read_text()).values() if len(str(v)) >= 16]
    return found


def test_no_credentials_in_the_repository(record):
    """Every tracked file's *content* (not only its name) is free of key-like strings and of this checkout's
    own service keys; the key files are git-ignored."""
    tracked = subprocess.run(["git", "-C", str(PROJECT), "ls-files", "-z"], capture_output=True).stdout.split(b"\0")
    own = _local_secrets()
    suspicious = []
    for rel in filter(None, (t.decode() for t in tracked)):
        path = PROJECT / rel
        if path.name in ("credentials.json", "config.local", "s3.json", "service-secrets.json") or \
                path.suffix in (".pem", ".key"):
            suspicious.append(rel)
        if not path.is_file() or path.stat().st_size > 8 << 20:
            continue
        data = path.read_bytes()
        if any(p.search(data) for p in _SECRET_PATTERNS) or any(s in data for s in own):
            suspicious.append(rel)
    ignored = subprocess.run(["git", "-C", str(PROJECT), "check-ignore", "-q", ".defectops/credentials.json"])
    record("security", f"no credentials in the content of {len(tracked)} tracked files; .defectops ignored")
    assert not suspicious, suspicious
    assert ignored.returncode == 0
    assert _SECRET_PATTERNS[2].search(b'secret_key = "' + b"a1" * 16 + b'"')  # the scan itself can fire


# ------------------------------------------------------------------------------------------------ network
def _listening(pid: int) -> list[tuple[str, int]]:
    """Listening TCP/UDP sockets of the process group led by `pid`."""
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) != pid:
                continue
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == 2 and conn.laddr):  # SOCK_DGRAM
                    out.append((conn.laddr.ip, conn.laddr.port))
        except (psutil.Error, ProcessLookupError):
            continue
    return out


def test_services_listen_on_loopback_only(services, record):
    seen = {}
    for name, pid in services.pids.items():
        seen[name] = _listening(pid)
        assert seen[name], f"{name}: no listening socket found for process group {pid}"
    exposed = {name: [a for a in addrs if a[0] not in ("127.0.0.1", "::1")] for name, addrs in seen.items()}
    record("security", f"services bind loopback only ({sum(map(len, seen.values()))} listening sockets)")
    assert not any(exposed.values()), exposed


def test_seaweedfs_refuses_unsigned_and_wrong_keys(object_store, store, record):
    obj = store.put_bytes(b"signed", ["security", "auth"], "probe.txt")
    url = f"{object_store.s3_endpoint}/{object_store.bucket}/{obj.key}"
    refused = []
    for method, data in (("GET", None), ("PUT", b"anonymous"), ("DELETE", None)):
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10)
        except urllib.error.HTTPError as exc:
            refused.append(exc.code)
    anonymous = boto3.client("s3", endpoint_url=object_store.s3_endpoint, region_name="us-east-1",
                             config=BotoConfig(signature_version=UNSIGNED))
    with pytest.raises(Exception) as unsigned:
        anonymous.list_objects_v2(Bucket=object_store.bucket)
    wrong = ObjectStore(object_store.s3_endpoint, object_store.bucket, object_store.access_key, "not-the-key-" * 3)
    with pytest.raises(AccessDeniedError):
        wrong.get_bytes(obj.uri, obj.sha256)
    record("security", "SeaweedFS refuses unsigned GET/PUT/DELETE, anonymous list and wrong keys")
    assert refused == [403, 403, 403], refused
    assert "AccessDenied" in str(unsigned.value) or "403" in str(unsigned.value)
    assert store.get_bytes(obj.uri, obj.sha256) == b"signed"  # untouched by the anonymous PUT/DELETE


# ------------------------------------------------------------------------------------------------ bit flips
def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index % len(out)] ^= 0x10
    return bytes(out)


def test_bit_flip_in_a_stored_bank_is_detected(tiny, store, object_store, tmp_path, record):
    obj = store.put_dir(tiny.model_dir, ["security", "bitflip"])
    s3 = boto3.client("s3", endpoint_url=object_store.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=object_store.access_key, aws_secret_access_key=object_store.secret_key)
    bucket, manifest_key = parse_uri(obj.uri)
    base = manifest_key.rsplit("/", 2)[0]
    files = json.loads(store.get_bytes(obj.uri, obj.sha256))["files"]
    keys = [manifest_key] + [f"{base}/{e['sha256']}/{rel}" for rel, e in sorted(files.items())]
    detected = 0
    for key in keys:
        original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.put_object(Bucket=bucket, Key=key, Body=_flip(original, len(original) // 2))
        try:
            with pytest.raises(ChecksumError):
                store.get_dir(obj.uri, tmp_path / "dest", obj.sha256)
            assert not (tmp_path / "dest").exists()
            detected += 1
        finally:
            s3.put_object(Bucket=bucket, Key=key, Body=original)
    record("security", f"bit flip in each of {len(keys)} stored objects of a bank detected")
    assert detected == len(keys)
    assert all(store.verify_dir(obj.uri, obj.sha256).values())  # restored


def test_bit_flip_in_a_local_model_and_feature_cache_is_detected(tiny, tmp_path, record):
    model = tmp_path / "model"
    shutil.copytree(tiny.model_dir, model)
    bank = model / "bank.safetensors"
    bank.write_bytes(_flip(bank.read_bytes(), 1000))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_detector(model)
    cache = tmp_path / "cache" / "key.safetensors"
    sha = write_cached_features(cache, torch.arange(64, dtype=torch.float32).reshape(8, 8))
    assert sha and cached_features_sha256(cache) == sha
    cache.write_bytes(_flip(cache.read_bytes(), 200))
    record("security", "bit flip in a local model folder and in the feature cache detected")
    assert cached_features_sha256(cache) is None and not cache.exists()  # a miss: recomputed, not used
