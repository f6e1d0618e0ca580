"""Mutual TLS for SeaweedFS's internal ports: its gRPC ports and the master's HTTP admin API (issue 16).

`weed mini` 4.48 has no login on the master's HTTP admin endpoints (`/vol/grow`, `/col/delete`) nor on any
gRPC port; the JWT keys in security.toml cover the filer and volume HTTP ports only. With the files made
here every gRPC port and the master's HTTP port demand a client certificate signed by this root's own CA,
which only the weed process holds: a local user without ``ROOT/seaweedfs/tls/`` (0700, key 0600) gets a
failed handshake. The CA's private key is used once to sign and then dropped, so nobody can mint another
certificate; deleting the folder makes a new set on the next start (restart SeaweedFS then).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COMMON_NAME = "defectops-seaweedfs"
_VALID_DAYS = 3650


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def ensure(folder: Path) -> TlsFiles:
    """The CA certificate, the one certificate every weed component serves and presents (server and client
    auth, 127.0.0.1 and localhost) and its key under ``folder``; made once, all three together."""
    files = TlsFiles(folder / "ca.crt", folder / "tls.crt", folder / "tls.key")
    if all(p.is_file() for p in (files.ca, files.cert, files.key)):
        if files.key.stat().st_mode & 0o077:
            os.chmod(files.key, 0o600)
        return files
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_pem, cert_pem, key_pem = _make()
    for path, data, mode in ((files.key, key_pem, 0o600), (files.cert, cert_pem, 0o644), (files.ca, ca_pem, 0o644)):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    logger.info("generated SeaweedFS's mutual-TLS certificates in %s", folder)
    return files


def _make() -> tuple[bytes, bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=_VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "defectops-local-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem
