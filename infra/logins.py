"""The logins that close the local services' side doors (issue 16): SeaweedFS's JWT-signed filer and volume
HTTP ports and its mutual-TLS gRPC and master ports, MLflow's basic-auth app, Prefect's API auth string. The
secrets come from ``infra.credentials.service_secrets`` (generated once, 0600); the files written here are
0600 too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from infra.tls import COMMON_NAME, TlsFiles

MLFLOW_USER = "defectops"
PREFECT_USER = "defectops"
_GRPC_PARTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq")


def seaweedfs_security(secrets: Mapping[str, str], tls: TlsFiles) -> str:
    """security.toml (read from weed's working directory): JWT-signed filer and volume HTTP, read and write
    (without them the filer port reads, writes and deletes bucket objects for anyone on the machine), and
    mutual TLS on every gRPC port and on the master's HTTP admin API (infra/tls.py), which have no other
    login in this version."""
    sections = (("jwt.signing", "seaweedfs_write_jwt"), ("jwt.signing.read", "seaweedfs_read_jwt"),
                ("jwt.filer_signing", "filer_write_jwt"), ("jwt.filer_signing.read", "filer_read_jwt"))
    text = "".join(f'[{name}]\nkey = "{secrets[key]}"\nexpires_after_seconds = 60\n\n' for name, key in sections)
    pair = f'cert = "{tls.cert}"\nkey = "{tls.key}"\n'
    text += f'[grpc]\nca = "{tls.ca}"\n\n'
    text += "".join(f"[grpc.{part}]\n{pair}allowed_commonNames = \"{COMMON_NAME}\"\n\n" for part in _GRPC_PARTS)
    text += f"[grpc.client]\n{pair}\n"
    return text + f'[https.master]\n{pair}ca = "{tls.ca}"\n'


def mlflow_auth_ini(home: Path, secrets: Mapping[str, str]) -> str:
    """MLflow's basic-auth app: every API, UI and artifact request needs the admin login (users get no
    permission by default; /health stays open)."""
    return (f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{home / 'auth.db'}\n"
            f"admin_username = {MLFLOW_USER}\nadmin_password = {secrets['mlflow_password']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def write_private_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
