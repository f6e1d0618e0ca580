"""infra's database choice and SeaweedFS's mutual-TLS files, without starting a server (the servers:
tests/e2e/test_postgres.py and tests/reliability/test_side_doors.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from infra import logins, tls
from infra.services import ServicesConfig, ServiceStartError, _check_database, _with_dependencies


def test_database_must_be_sqlite_or_postgresql():
    with pytest.raises(ValueError, match="database='mysql'"):
        ServicesConfig(database="mysql")


@pytest.mark.parametrize(("services", "database", "expected"), [
    (("seaweedfs", "mlflow", "prefect"), "sqlite", ["seaweedfs", "mlflow", "prefect"]),
    (("seaweedfs", "mlflow", "prefect"), "postgresql", ["seaweedfs", "postgres", "mlflow", "prefect"]),
    (("prefect",), "postgresql", ["postgres", "prefect"]),
    (("mlflow",), "postgresql", ["seaweedfs", "postgres", "mlflow"]),
    (("seaweedfs",), "postgresql", ["seaweedfs"]),  # nothing uses the database: it is not started
])
def test_the_cluster_starts_under_the_servers_that_use_it(services, database, expected):
    assert _with_dependencies(ServicesConfig(services=services, database=database)) == expected


def test_a_root_is_never_started_on_the_other_database(tmp_path: Path):
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "mlflow.db").write_bytes(b"")
    with pytest.raises(ServiceStartError, match="SQLite"):
        _check_database(ServicesConfig(root=tmp_path, database="postgresql"), tmp_path)
    _check_database(ServicesConfig(root=tmp_path, database="sqlite"), tmp_path)
    _check_database(ServicesConfig(root=tmp_path, database="postgresql", services=("seaweedfs",)), tmp_path)

    other = tmp_path / "other"
    (other / "postgres" / "data").mkdir(parents=True)
    (other / "postgres" / "data" / "PG_VERSION").write_text("15\n")
    with pytest.raises(ServiceStartError, match="PostgreSQL"):
        _check_database(ServicesConfig(root=other, database="sqlite"), other)
    _check_database(ServicesConfig(root=other, database="postgresql"), other)


def test_tls_files_are_made_once_private_and_chained(tmp_path: Path):
    files = tls.ensure(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises when the chain is broken
    assert cert.subject.rfc4514_string() == f"CN={tls.COMMON_NAME}"
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700 and files.key.stat().st_mode & 0o777 == 0o600
    assert not list((tmp_path / "tls").glob("*ca*.key"))  # the CA's key is not kept: nobody mints more
    before = [p.read_bytes() for p in (files.ca, files.cert, files.key)]
    assert tls.ensure(tmp_path / "tls") == files
    assert [p.read_bytes() for p in (files.ca, files.cert, files.key)] == before  # made once, not per start
    files.cert.unlink()  # a partial set is made again, all three together
    again = tls.ensure(tmp_path / "tls")
    x509.load_pem_x509_certificate(again.cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(again.ca.read_bytes()))
    assert again.ca.read_bytes() != before[0]


def test_security_toml_turns_on_mutual_tls_for_grpc_and_the_master(tmp_path: Path):
    import tomllib

    files = tls.ensure(tmp_path / "tls")
    secrets = {k: "x" * 32 for k in ("seaweedfs_write_jwt", "seaweedfs_read_jwt", "filer_write_jwt", "filer_read_jwt")}
    conf = tomllib.loads(logins.seaweedfs_security(secrets, files))
    assert conf["grpc"]["ca"] == str(files.ca)
    for part in ("master", "volume", "filer", "s3", "admin", "worker"):
        assert conf["grpc"][part]["cert"] == str(files.cert), part
        assert conf["grpc"][part]["allowed_commonNames"] == tls.COMMON_NAME
    assert conf["grpc"]["client"]["key"] == str(files.key)
    assert conf["https"]["master"]["ca"] == str(files.ca)  # a CA there means client certificates are required
    assert conf["jwt"]["signing"]["key"] == "x" * 32
