"""No unauthenticated read, write or delete through any listening port of the local stack (issue 16, Medium).

Every TCP port that SeaweedFS, MLflow and Prefect listen on is tried without credentials with the requests
that read, write or delete data on any of them: SeaweedFS filer/volume/S3 object paths, MLflow's registry,
alias and artifact-proxy API, Prefect's flow and flow-run API. None may answer 2xx, and afterwards the probe
objects must not exist and the sentinel object must be unchanged.

Known gap (documented in docs/reliability.md, pinned by a strict xfail below): SeaweedFS's master HTTP
admin endpoints (`/col/delete`, `/vol/grow`) and the gRPC ports of `weed mini` have no authentication in this
version short of mutual TLS; its IP white list would also block the S3 gateway's own calls.
"""

from __future__ import annotations

import http.client
import json
import uuid

import boto3
import pytest

from infra.credentials import SERVICE_SECRETS_FILE
from tests.reliability.test_security import _listening

PROBE = f"zz-probe-{uuid.uuid4().hex[:8]}"


def _requests(bucket: str, sentinel_key: str) -> list[tuple[str, str, bytes | None, dict]]:
    form = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.txt\"\r\n"
            b"Content-Type: text/plain\r\n\r\nanonymous\r\n--B--\r\n")
    multipart = {"Content-Type": "multipart/form-data; boundary=B"}
    as_json = {"Content-Type": "application/json"}
    alias = json.dumps({"name": "defectops-reliable", "alias": "champion", "version": "1"}).encode()
    return [
        # SeaweedFS filer, volume and S3 paths
        ("GET", f"/buckets/{bucket}/{sentinel_key}", None, {}),
        ("GET", f"/buckets/{bucket}/", None, {"Accept": "application/json"}),
        ("POST", f"/buckets/{bucket}/{PROBE}/x.txt", form, multipart),
        ("PUT", f"/buckets/{bucket}/{PROBE}/y.txt", b"anonymous", {}),
        ("DELETE", f"/buckets/{bucket}/{sentinel_key}", None, {}),
        ("GET", f"/{bucket}/{sentinel_key}", None, {}),
        ("PUT", f"/{bucket}/{PROBE}/z.txt", b"anonymous", {}),
        ("DELETE", f"/{bucket}/{sentinel_key}", None, {}),
        ("GET", "/1,01", None, {}),
        # MLflow: registry read, alias move, model creation, proxied artifacts
        ("GET", "/api/2.0/mlflow/registered-models/search", None, {}),
        ("GET", "/api/2.0/mlflow/experiments/search?max_results=5", None, {}),
        ("POST", "/api/2.0/mlflow/registered-models/alias", alias, as_json),
        ("POST", "/api/2.0/mlflow/registered-models/create", json.dumps({"name": PROBE}).encode(), as_json),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts", None, {}),
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{PROBE}/x.txt", b"anonymous", {}),
        ("GET", f"/ajax-api/2.0/mlflow-artifacts/artifacts?path={PROBE}", None, {}),
        # Prefect API
        ("POST", "/api/flows/filter", b"{}", as_json),
        ("POST", "/api/flow_runs/filter", b"{}", as_json),
        ("POST", "/api/flows/", json.dumps({"name": PROBE}).encode(), as_json),
        ("POST", "/api/deployments/filter", b"{}", as_json),
    ]


def _status(port: int, method: str, path: str, body: bytes | None, headers: dict) -> int | None:
    """HTTP status, or None when the port does not speak HTTP/1.1 (gRPC) or drops the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_no_port_of_the_stack_serves_data_without_credentials(services, store, record):
    sentinel = store.put_bytes(b"sentinel", ["security", "side-doors"], "sentinel.txt")
    ports = sorted({port for pid in services.pids.values() for ip, port in _listening(pid) if ip == "127.0.0.1"})
    assert len(ports) >= 8, ports  # S3 + filer/master/volume (HTTP, gRPC) + MLflow + Prefect
    answered = []
    for port in ports:
        for method, path, body, headers in _requests(services.bucket, sentinel.key):
            code = _status(port, method, path, body, headers)
            if code is not None and 200 <= code < 300:
                answered.append(f"{method} :{port}{path.split('?')[0]} -> {code}")
    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=services.access_key, aws_secret_access_key=services.secret_key)
    planted = [o["Key"] for o in s3.list_objects_v2(Bucket=services.bucket).get("Contents", []) if PROBE in o["Key"]]
    record("security", f"{len(ports)} listening ports x {len(_requests('b', 'k'))} unauthenticated data requests: "
                       "none served")
    assert not answered, answered
    assert not planted, planted
    assert store.get_bytes(sentinel.uri, sentinel.sha256) == b"sentinel"


def test_service_secrets_are_generated_once_and_private(services, record):
    root = services.root
    files = [root / SERVICE_SECRETS_FILE, root / "seaweedfs" / "security.toml", root / "mlflow" / "auth.ini"]
    from infra.credentials import service_secrets

    first = service_secrets(root)
    record("security", "service secrets (JWT keys, MLflow and Prefect logins) generated once, mode 0600")
    assert all(f.is_file() and f.stat().st_mode & 0o077 == 0 for f in files), [oct(f.stat().st_mode) for f in files]
    assert service_secrets(root) == first and all(len(v) >= 32 for v in first.values())
    assert services.mlflow_password == first["mlflow_password"]
    assert services.prefect_auth.endswith(first["prefect_password"])


@pytest.mark.xfail(strict=True, reason="SeaweedFS master admin HTTP has no auth in weed mini 4.48 (see module doc)")
def test_seaweedfs_master_admin_endpoints_refuse_anonymous(services):
    ports = [p for pid in [services.pids["seaweedfs"]] for _, p in _listening(pid)]
    grow = [(p, _status(p, "GET", f"/vol/grow?collection={PROBE}&count=1", None, {})) for p in ports]
    assert not [p for p, code in grow if code == 200], grow


def test_prefect_cors_is_not_a_wildcard(services, record):
    port = int(services.prefect_api_url.rsplit(":", 1)[1].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("OPTIONS", "/api/flows/filter", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "POST"})
    allowed = conn.getresponse().getheader("access-control-allow-origin")
    conn.close()
    record("security", "Prefect CORS: only its own origin")
    assert allowed in (None, f"http://127.0.0.1:{port}"), allowed
