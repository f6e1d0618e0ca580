"""The object store's access keys for the local services: from the config, the environment, or generated once.

Precedence: explicit values in ``ServicesConfig`` (which default from ``DEFECTOPS_S3_ACCESS_KEY`` /
``DEFECTOPS_S3_SECRET_KEY``) > ``ROOT/credentials.json`` > newly generated keys written there with mode 0600.
Keys are never printed or logged; ``Credentials.__repr__`` hides them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ACCESS_KEY_ENV = "DEFECTOPS_S3_ACCESS_KEY"
SECRET_KEY_ENV = "DEFECTOPS_S3_SECRET_KEY"
CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class Credentials:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)


def load_or_create(root: Path, access_key: str = "", secret_key: str = "") -> Credentials:
    """Return the keys to use for ``root``; generate and store them on first use when none are given."""
    if bool(access_key) != bool(secret_key):
        raise ValueError(f"give both {ACCESS_KEY_ENV} and {SECRET_KEY_ENV}, or neither")
    if access_key:
        return Credentials(access_key, secret_key)
    path = root / CREDENTIALS_FILE
    if path.exists():
        return _read(path)
    creds = Credentials(access_key="defectops-" + secrets.token_hex(8), secret_key=secrets.token_hex(24))
    write_private_json(path, {"access_key": creds.access_key, "secret_key": creds.secret_key})
    logger.info("generated object store credentials in %s (mode 0600)", path)
    return creds


SERVICE_TOKEN_ENV = "DEFECTOPS_SERVICE_TOKEN"
SERVICE_TOKEN_FILE = "service-token.json"


def service_token(root: Path, env: dict[str, str] | None = None) -> str:
    """The bearer token the inference service requires for changes (feedback, review, reload, export):
    ``DEFECTOPS_SERVICE_TOKEN`` when set, else ``ROOT/service-token.json`` (0600), generated on first use."""
    given = (os.environ if env is None else env).get(SERVICE_TOKEN_ENV, "")
    if given:
        if len(given) < 16:
            raise ValueError(f"{SERVICE_TOKEN_ENV} is too short: use at least 16 characters")
        return given
    path = root / SERVICE_TOKEN_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        try:
            return str(json.loads(path.read_text())["token"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: not a token file with 'token'; fix or delete it (a new one is then "
                             "generated)") from None
    token = secrets.token_urlsafe(24)
    write_private_json(path, {"token": token})
    logger.info("generated the service token in %s (mode 0600)", path)
    return token


SERVICE_SECRETS_FILE = "service-secrets.json"
SERVICE_SECRET_NAMES = ("seaweedfs_write_jwt", "seaweedfs_read_jwt", "filer_write_jwt", "filer_read_jwt",
                    "mlflow_password", "mlflow_flask_secret", "prefect_password", "postgres_password")


def service_secrets(root: Path) -> dict[str, str]:
    """The keys that close the local services' side doors, generated once into ``ROOT/service-secrets.json``
    (0600): SeaweedFS's JWT signing keys (volume and filer, read and write: its filer and volume HTTP ports
    refuse unsigned requests), the MLflow admin password and Flask secret (basic-auth app), the Prefect API
    password (``PREFECT_SERVER_API_AUTH_STRING``), the PostgreSQL password (``services.database:
    postgresql``). Keys missing from an older file are added to it."""
    path = root / SERVICE_SECRETS_FILE
    data: dict[str, str] = {}
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        try:
            data = {k: str(v) for k, v in json.loads(path.read_text()).items()}
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path}: not a JSON object of secrets; fix or delete it (new ones are then "
                             "generated, and the services must be restarted)") from None
    missing = [name for name in SERVICE_SECRET_NAMES if not data.get(name)]
    if missing:
        data.update({name: secrets.token_urlsafe(32) for name in missing})
        write_private_json(path, data)
        logger.info("generated %d service secrets in %s (mode 0600)", len(missing), path)
    return data


def _read(path: Path) -> Credentials:
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
        logger.warning("%s was readable by others; its mode is now 0600", path)
    try:
        data = json.loads(path.read_text())
        return Credentials(str(data["access_key"]), str(data["secret_key"]))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a credentials file with 'access_key' and 'secret_key' ({type(exc).__name__}); "
            "fix or delete it (a new pair is then generated)"
        ) from None


def write_private_json(path: Path, payload: object) -> None:
    """Write ``payload`` as JSON readable by the owner only (created 0600, then atomically renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
