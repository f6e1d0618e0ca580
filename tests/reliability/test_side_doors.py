"""No unauthenticated read, write or delete through any listening port of the local stack (issue 16, Medium).

Every TCP port that SeaweedFS, MLflow and Prefect listen on is tried without credentials with the requests
that read, write or delete data on any of them: SeaweedFS filer/volume/S3 object paths, MLflow's registry,
alias and artifact-proxy API, Prefect's flow and flow-run API. None may answer 2xx, and afterwards the probe
objects must not exist and the sentinel object must be unchanged.

SeaweedFS's master HTTP admin endpoints (`/col/delete`, `/vol/grow`) and the gRPC ports of `weed mini` have
no login in this version: they run mutual TLS with a certificate only the weed process holds (infra/tls.py),
and a test shows both refuse a client without it while accepting one with it.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import uuid
from pathlib import Path

import boto3

from infra import pidfile
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


def _client_context(cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A TLS client that does not check the server, presenting the stack's certificate when given."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(*map(str, cert))
    return ctx


def _tls_status(port: int, path: str, cert: tuple[Path, Path] | None) -> int | str:
    """HTTPS GET status with or without the stack's client certificate, or the handshake error's name."""
    ctx = _client_context(cert)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def _grpc_handshake(port: int, cert: tuple[Path, Path] | None) -> bool:
    """True when a TLS handshake (ALPN h2, as gRPC clients do) completes and the server keeps talking."""
    ctx = _client_context(cert)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            return bool(tls.recv(9))  # the server's SETTINGS frame; TLS 1.3 reports a refused cert here
    except (OSError, ssl.SSLError):
        return False


def test_seaweedfs_master_admin_and_grpc_demand_the_stacks_client_certificate(services, record):
    """/vol/grow and /col/delete on every weed port, plain and over TLS without a certificate: never 2xx; every
    gRPC port refuses a TLS client without the certificate. Controls: with ROOT/seaweedfs/tls's certificate
    the master answers /dir/status and the gRPC ports complete the handshake, so the refusals are the
    certificate check, not a closed or misnamed port."""
    rec = pidfile.read_records(services.root)["seaweedfs"]
    tls_dir = services.root / "seaweedfs" / "tls"
    cert = (tls_dir / "tls.crt", tls_dir / "tls.key")
    ports = sorted({p for _, p in _listening(services.pids["seaweedfs"])})
    admin = [f"/vol/grow?collection={PROBE}&count=1", f"/col/delete?collection={PROBE}"]
    answered = [f"http :{p}{a}" for p in ports for a in admin
                if (code := _status(p, "GET", a, None, {})) is not None and 200 <= code < 300]
    answered += [f"https :{p}{a}" for p in ports for a in admin if _tls_status(p, a, None) in range(200, 300)]
    master = rec["extra_ports"]["master.port"]
    grpc = sorted(p for name, p in rec["extra_ports"].items() if name.endswith(".grpc"))
    anonymous_grpc = [p for p in grpc if _grpc_handshake(p, None)]
    record("security", f"SeaweedFS master admin API and {len(grpc)} gRPC ports: client certificate required")
    assert _tls_status(master, "/dir/status", cert) == 200
    assert all(_grpc_handshake(p, cert) for p in grpc), grpc
    assert not answered, answered
    assert not anonymous_grpc, anonymous_grpc
    assert tls_dir.stat().st_mode & 0o077 == 0 and cert[1].stat().st_mode & 0o077 == 0


def test_prefect_cors_is_not_a_wildcard(services, record):
    port = int(services.prefect_api_url.rsplit(":", 1)[1].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("OPTIONS", "/api/flows/filter", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "POST"})
    allowed = conn.getresponse().getheader("access-control-allow-origin")
    conn.close()
    record("security", "Prefect CORS: only its own origin")
    assert allowed in (None, f"http://127.0.0.1:{port}"), allowed
