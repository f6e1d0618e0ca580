"""Content-addressed object storage for banks, weights and results: the only module that imports boto3.

Keys are ``<prefix>/<sha256>/<filename>``; the sha256 is also stored as object metadata and checked on every
download (temp file in the destination's directory, verified, then atomically renamed). An upload is skipped
only when the stored bytes are re-read and hash to the key's sha256 (metadata alone is never trusted); a
corrupt object is uploaded again from the local copy (``store.repaired`` lists those keys). A directory is
stored as its files plus a manifest (relative path -> sha256, size) whose own sha256 addresses the whole:

    store = ObjectStore.from_env()
    obj = store.put_dir(Path("model"), "models/cookie")      # StoredObject(uri, key, sha256, size)
    store.get_dir(obj.uri, Path("cache/model"), obj.sha256)

Every failure is a ``StorageError`` whose message names endpoint, bucket, key and reason, never the keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

from infra import faults

logger = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "defectops.dir-manifest/1"
_PART_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024
_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_MISSING = {"404", "NoSuchKey", "NotFound"}
_UNREACHABLE = (BotoConnectionError, HTTPClientError, RetriesExceededError)  # refused, timeouts, resets
MULTIPART_THRESHOLD_ENV = "DEFECTOPS_S3_MULTIPART_THRESHOLD"
CONNECT_TIMEOUT_ENV, READ_TIMEOUT_ENV = "DEFECTOPS_S3_CONNECT_TIMEOUT_S", "DEFECTOPS_S3_READ_TIMEOUT_S"


class StorageError(RuntimeError):
    """An object store operation failed; ``endpoint``, ``bucket``, ``key`` and ``reason`` say which and why."""

    def __init__(self, endpoint: str, bucket: str, key: str, reason: str) -> None:
        self.endpoint, self.bucket, self.key, self.reason = endpoint, bucket, key, reason
        super().__init__(f"s3://{bucket}/{key} at {endpoint}: {reason}")


class EndpointUnreachableError(StorageError):
    """The endpoint did not answer (down, wrong port, timeout) within the bounded retries."""


class AccessDeniedError(StorageError):
    """The server rejected the credentials or the request's signature."""


class BucketNotFoundError(StorageError):
    """The bucket does not exist."""


class ObjectNotFoundError(StorageError):
    """The key does not exist in an existing bucket."""


class ChecksumError(StorageError):
    """Downloaded bytes do not hash to the expected sha256; nothing was written at the destination."""


class ManifestError(StorageError):
    """A directory manifest that is not a valid, safe defectops manifest."""


class InvalidKeyError(StorageError, ValueError):
    """A prefix, filename or manifest path is not made of safe parts ``[A-Za-z0-9._-]+``."""


@dataclass(frozen=True)
class StoredObject:
    uri: str
    key: str
    sha256: str
    size: int


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks. (components.detector has the same six lines:
    importing anything from components/ imports torch, which the object store client and `up` must not.)"""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"{uri!r}: expected s3://BUCKET/KEY")
    bucket, key = uri[5:].split("/", 1)
    if not bucket or not key:
        raise ValueError(f"{uri!r}: expected s3://BUCKET/KEY")
    return bucket, key


def _bad_part(parts: Sequence[str]) -> str | None:
    """The first part that is not ``[A-Za-z0-9._-]+`` (or is '.' / '..'), else None."""
    for part in parts:
        if not _PART_RE.match(part) or part in (".", ".."):
            return part
    return None


def _check_sha(sha: str, where: str) -> None:
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise ValueError(f"{where}: expected_sha256 {sha!r} is not 64 lowercase hex digits")


class ObjectStore:
    """An S3 bucket seen through a boto3 client with bounded retries and timeouts."""

    def __init__(self, endpoint_url: str, bucket: str, access_key: str, secret_key: str, *,
                 region: str = "us-east-1", connect_timeout: float = 5, read_timeout: float = 60,
                 max_attempts: int = 4, multipart_threshold: int = 64 * _CHUNK) -> None:
        self.endpoint_url, self.bucket = endpoint_url, bucket
        self.repaired: list[str] = []  # keys whose stored bytes were corrupt and were uploaded again
        # S3 parts are at least 5 MiB; files over the threshold go up and down in parallel parts.
        chunk = max(5 * _CHUNK, min(16 * _CHUNK, multipart_threshold))
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=chunk,
                                        max_concurrency=4)
        config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},  # incl. the first
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        signature_version="s3v4", s3={"addressing_style": "path"})
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=config)

    def __repr__(self) -> str:
        return f"ObjectStore(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r})"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **kwargs) -> ObjectStore:
        """From DEFECTOPS_S3_ENDPOINT, DEFECTOPS_BUCKET and AWS_* (or DEFECTOPS_S3_*) keys; files of at
        least DEFECTOPS_S3_MULTIPART_THRESHOLD bytes (default 64 MiB) go up in multipart uploads;
        DEFECTOPS_S3_CONNECT_TIMEOUT_S / DEFECTOPS_S3_READ_TIMEOUT_S bound each request (defaults 5 / 60 s)."""
        env = dict(os.environ if env is None else env)
        access = env.get("AWS_ACCESS_KEY_ID") or env.get("DEFECTOPS_S3_ACCESS_KEY")
        secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("DEFECTOPS_S3_SECRET_KEY")
        missing = [name for name, value in (("DEFECTOPS_S3_ENDPOINT", env.get("DEFECTOPS_S3_ENDPOINT")),
                                            ("DEFECTOPS_BUCKET", env.get("DEFECTOPS_BUCKET")),
                                            ("AWS_ACCESS_KEY_ID", access), ("AWS_SECRET_ACCESS_KEY", secret))
                   if not value]
        if missing:
            raise ValueError(f"object store not configured: set {', '.join(missing)} "
                             "(python -m infra start, then infra.services.env_for_clients)")
        for name, kwarg in ((CONNECT_TIMEOUT_ENV, "connect_timeout"), (READ_TIMEOUT_ENV, "read_timeout")):
            text = env.get(name, "").strip()
            if text:  # the user's bound wins over the caller's default: a hung store fails after it
                try:
                    kwargs[kwarg] = float(text)
                except ValueError:
                    kwargs[kwarg] = -1.0
                if not 0 < kwargs[kwarg] <= 3600:
                    raise ValueError(f"{name}={text!r}: expected seconds, more than 0 and at most 3600")
        threshold = env.get(MULTIPART_THRESHOLD_ENV, "").strip()
        if threshold and "multipart_threshold" not in kwargs:
            if not threshold.isdigit() or int(threshold) < 1:
                raise ValueError(f"{MULTIPART_THRESHOLD_ENV}={threshold!r}: expected a positive number of bytes")
            kwargs["multipart_threshold"] = int(threshold)
        return cls(env["DEFECTOPS_S3_ENDPOINT"], env["DEFECTOPS_BUCKET"], access, secret, **kwargs)

    # ------------------------------------------------------------ errors

    def _error(self, exc: Exception, bucket: str, key: str, action: str) -> StorageError:
        """Translate a botocore exception into a StorageError with a one-line reason."""
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _DENIED:
                return AccessDeniedError(self.endpoint_url, bucket, key,
                                         f"{action}: access denied ({code}): wrong credentials or no permission")
            if code == "NoSuchBucket":
                return BucketNotFoundError(self.endpoint_url, bucket, key, f"{action}: bucket does not exist")
            if code in _MISSING:
                return ObjectNotFoundError(self.endpoint_url, bucket, key, f"{action}: no such key")
            return StorageError(self.endpoint_url, bucket, key, f"{action}: server error {code} (HTTP {status})")
        if isinstance(exc, _UNREACHABLE):
            return EndpointUnreachableError(self.endpoint_url, bucket, key,
                                            f"{action}: endpoint unreachable ({type(exc).__name__})")
        return StorageError(self.endpoint_url, bucket, key, f"{action}: {type(exc).__name__}")

    def _call(self, action: str, bucket: str, key: str, fn, /, **kwargs):
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, RetriesExceededError) as exc:
            err = self._error(exc, bucket, key, action)
        if isinstance(err, ObjectNotFoundError) and not self._bucket_exists(bucket, key):
            err = BucketNotFoundError(self.endpoint_url, bucket, key, f"{action}: bucket does not exist")
        raise err

    def _bucket_exists(self, bucket: str, key: str = "") -> bool:
        try:
            self._client.head_bucket(Bucket=bucket)
            return True
        except (ClientError, BotoCoreError, RetriesExceededError) as exc:
            err = self._error(exc, bucket, key, "head bucket")
        if isinstance(err, ObjectNotFoundError):
            return False
        raise err

    def ensure_bucket(self) -> bool:
        """Create the bucket if missing; True if it was created."""
        if self._bucket_exists(self.bucket):
            return False
        self._call("create bucket", self.bucket, "", self._client.create_bucket, Bucket=self.bucket)
        return True

    # ------------------------------------------------------------ keys

    def _key(self, prefix: str | Sequence[str], sha: str, name: str) -> str:
        parts = prefix.split("/") if isinstance(prefix, str) else list(prefix)
        bad = _bad_part([*parts, name])
        if bad is not None:
            raise InvalidKeyError(self.endpoint_url, self.bucket, f"{prefix}/{name}",
                                  f"part {bad!r} must match [A-Za-z0-9._-]+ and not be '.' or '..'")
        return "/".join([*parts, sha, name])

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _head(self, bucket: str, key: str) -> dict | None:
        try:
            return self._call("head", bucket, key, self._client.head_object, Bucket=bucket, Key=key)
        except ObjectNotFoundError:
            return None

    def exists(self, uri: str) -> bool:
        """True if the object exists; BucketNotFoundError if its bucket does not."""
        return self._head(*parse_uri(uri)) is not None

    # ------------------------------------------------------------ put

    def _already_stored(self, key: str, sha: str, size: int) -> bool:
        """True only when the object exists and its *bytes* hash to ``sha``: metadata and size are a first
        filter, never a proof (a bit flipped under intact metadata would otherwise never be repaired).
        An object whose bytes differ is logged and re-uploaded by the caller from the local copy."""
        head = self._head(self.bucket, key)
        if head is None or head.get("Metadata", {}).get("sha256") != sha or head["ContentLength"] != size:
            return False
        if self.verify(self._uri(key), sha):
            return True
        self.repaired.append(key)
        logger.warning("%s: stored bytes do not hash to %s; re-uploading it from the local copy",
                       self._uri(key), sha[:12])
        return False

    def put_file(self, path: Path, prefix: str | Sequence[str]) -> StoredObject:
        """Upload ``path`` to ``prefix/<sha256>/<name>`` (multipart when big); skip it if already there."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a file, nothing to upload")
        sha, size = sha256_file(path), path.stat().st_size
        key = self._key(prefix, sha, path.name)
        if self._already_stored(key, sha, size):
            logger.debug("%s already stored", key)
        else:
            try:
                self._client.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha}},
                                         Config=self._transfer, Callback=self._fault_callback(size))
            except (ClientError, BotoCoreError, RetriesExceededError, S3UploadFailedError) as exc:
                cause = exc.__context__ if isinstance(exc, S3UploadFailedError) else exc
                raise self._error(cause or exc, self.bucket, key, "upload") from None
            logger.info("uploaded %s (%d bytes)", self._uri(key), size)
        return StoredObject(self._uri(key), key, sha, size)

    def _fault_callback(self, size: int):
        """The reliability tests' "upload.multipart" pause point (infra.faults), reached once while the
        parts of a multipart upload are being sent; None (no callback at all) unless a test armed it."""
        if size < self._transfer.multipart_threshold or not faults.armed("upload.multipart"):
            return None
        fired: list[bool] = []

        def callback(_sent: int) -> None:
            if not fired:
                fired.append(True)
                faults.reached("upload.multipart")
        return callback

    def put_bytes(self, data: bytes, prefix: str | Sequence[str], name: str) -> StoredObject:
        """Upload small bytes (JSON, CSV) to ``prefix/<sha256>/<name>``; skip them if already there."""
        sha = hashlib.sha256(data).hexdigest()
        key = self._key(prefix, sha, name)
        if not self._already_stored(key, sha, len(data)):
            self._call("upload", self.bucket, key, self._client.put_object, Bucket=self.bucket, Key=key,
                       Body=data, Metadata={"sha256": sha})
            logger.info("uploaded %s (%d bytes)", self._uri(key), len(data))
        return StoredObject(self._uri(key), key, sha, len(data))

    def put_dir(self, directory: Path, prefix: str | Sequence[str]) -> StoredObject:
        """Upload every file under ``directory`` and a manifest; return the manifest (the directory's address)."""
        directory = Path(directory)
        files = sorted(p for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{directory}: not a directory with files, nothing to upload")
        entries = {}
        for path in files:
            rel = path.relative_to(directory).as_posix()
            bad = _bad_part(rel.split("/"))
            if bad is not None:
                raise InvalidKeyError(self.endpoint_url, self.bucket, rel,
                                      f"{directory}: path part {bad!r} must match [A-Za-z0-9._-]+")
            stored = self.put_file(path, prefix)
            entries[rel] = {"sha256": stored.sha256, "size": stored.size}
        manifest = {"format": MANIFEST_FORMAT, "files": entries}
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        return self.put_bytes(data, prefix, MANIFEST_NAME)

    # ------------------------------------------------------------ get

    def get_bytes(self, uri: str, expected_sha256: str) -> bytes:
        """Download a small object and check its sha256 (ChecksumError on mismatch)."""
        _check_sha(expected_sha256, uri)
        bucket, key = parse_uri(uri)
        response = self._call("download", bucket, key, self._client.get_object, Bucket=bucket, Key=key)
        try:
            data = response["Body"].read()
        except (ClientError, BotoCoreError, RetriesExceededError) as exc:
            raise self._error(exc, bucket, key, "download") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ChecksumError(self.endpoint_url, bucket, key, f"sha256 is {actual}, expected {expected_sha256}")
        return data

    def get_file(self, uri: str, dest: Path, expected_sha256: str) -> Path:
        """Download to a temp file next to ``dest``, check its sha256, then rename it onto ``dest``."""
        _check_sha(expected_sha256, uri)
        bucket, key = parse_uri(uri)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                self._call("download", bucket, key, self._client.download_fileobj, Bucket=bucket, Key=key,
                           Fileobj=fh, Config=self._transfer)
                fh.flush()
                os.fsync(fh.fileno())
            actual = sha256_file(tmp)
            if actual != expected_sha256:
                raise ChecksumError(self.endpoint_url, bucket, key,
                                    f"sha256 is {actual}, expected {expected_sha256}; {dest} left untouched")
            tmp.chmod(0o644)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def get_dir(self, uri: str, dest: Path, expected_sha256: str, *, overwrite: bool = False) -> Path:
        """Fetch a ``put_dir`` manifest and every file it lists, each verified; rename the whole onto ``dest``."""
        entries = self._dir_entries(uri, expected_sha256)
        dest = Path(dest)
        if dest.exists() and not overwrite:
            raise FileExistsError(f"{dest}: already exists; remove it, pass overwrite=True or choose another path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
        try:
            for rel, (file_uri, sha) in entries.items():
                self.get_file(file_uri, tmp / rel, sha)
            tmp.chmod(0o755)
            _replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def verify_dir(self, uri: str, expected_sha256: str) -> dict[str, bool]:
        """Re-download a ``put_dir`` manifest (ChecksumError if it changed) and hash every file it lists:
        relative path -> True when the stored bytes still match."""
        return {rel: self.verify(file_uri, sha) for rel, (file_uri, sha) in
                sorted(self._dir_entries(uri, expected_sha256).items())}

    def _dir_entries(self, uri: str, expected_sha256: str) -> dict[str, tuple[str, str]]:
        """The verified manifest at ``uri`` -> {relative path: (object URI, sha256)} (put_dir's key layout)."""
        bucket, key = parse_uri(uri)
        files = self._parse_manifest(self.get_bytes(uri, expected_sha256), bucket, key)
        base = key.rsplit("/", 2)[0]
        return {rel: (f"s3://{bucket}/{base}/{sha}/{rel.rsplit('/', 1)[-1]}", sha) for rel, (sha, _size) in files.items()}

    def _parse_manifest(self, data: bytes, bucket: str, key: str) -> dict[str, tuple[str, int]]:
        try:
            manifest = json.loads(data)
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(manifest.get("format"))
            files = {rel: (e["sha256"], int(e["size"])) for rel, e in manifest["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ManifestError(self.endpoint_url, bucket, key, f"not a {MANIFEST_FORMAT} manifest") from None
        for rel, (sha, _size) in files.items():
            if _bad_part(rel.split("/")) is not None or not _SHA_RE.match(str(sha)):
                raise ManifestError(self.endpoint_url, bucket, key, f"manifest entry {rel!r} is not safe")
        return files

    def list_objects(self, prefix: str) -> list[tuple[str, int, float]]:
        """(key, size, last-modified epoch seconds) of every object under `prefix` (paginated listing)."""
        out = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                out += [(o["Key"], int(o["Size"]), o["LastModified"].timestamp()) for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError, RetriesExceededError) as exc:
            raise self._error(exc, self.bucket, prefix, "list") from None
        return out

    def delete(self, key: str) -> None:
        """Delete one object (used by `defectops gc --delete` only)."""
        self._call("delete", self.bucket, key, self._client.delete_object, Bucket=self.bucket, Key=key)

    def dir_keys(self, uri: str, expected_sha256: str) -> set[str]:
        """The keys of a ``put_dir`` directory: its manifest's and every file's (manifest sha256-verified)."""
        return {parse_uri(uri)[1]} | {parse_uri(u)[1] for u, _ in self._dir_entries(uri, expected_sha256).values()}

    def verify(self, uri: str, expected_sha256: str) -> bool:
        """Re-download and hash the object; False if it differs or is missing."""
        _check_sha(expected_sha256, uri)
        bucket, key = parse_uri(uri)
        try:
            response = self._call("verify", bucket, key, self._client.get_object, Bucket=bucket, Key=key)
        except ObjectNotFoundError:
            return False
        digest = hashlib.sha256()
        try:
            for chunk in response["Body"].iter_chunks(_CHUNK):
                digest.update(chunk)
        except (ClientError, BotoCoreError, RetriesExceededError) as exc:
            raise self._error(exc, bucket, key, "verify") from None
        return digest.hexdigest() == expected_sha256


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename ``src`` onto ``dest``; an existing ``dest`` is moved aside first and removed after."""
    if not dest.exists():
        os.rename(src, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, old / "d")
    os.rename(src, dest)
    shutil.rmtree(old, ignore_errors=True)
