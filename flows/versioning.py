"""Data and code versions: the only module that runs DVC (through the `dvc` CLI next to this interpreter).

The data registry is a git + DVC repository at ``<services.root>/data-registry``. Versioning a line copies the
exact images a retrain uses (the first ``max_train_images`` good train images in natural order, every test
image and its mask) under ``lines/<line>/``, runs ``dvc add``, commits ``lines/<line>.dvc`` and pushes the
data to the remote ``s3://<bucket>/dvc`` on the object store:

    data = version_line("cookie", Path("/data/cookie"), registry_dir, max_train_images=10)
    data.dvc_md5        # "<md5>.dir", read back from lines/cookie.dvc
    data.remote_path    # s3://<bucket>/dvc/files/md5/<2>/<rest>.dir

The endpoint and keys come from the environment (DEFECTOPS_S3_ENDPOINT, DEFECTOPS_BUCKET, AWS_*) and are
written to the registry's ``.dvc/config.local`` (mode 0600, never committed) on every call.
"""

from __future__ import annotations

import configparser
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from components.data import LineSplit, scan_line

logger = logging.getLogger(__name__)

REMOTE = "store"
NO_COMMIT = "none"
_GIT_IDENTITY = ("-c", "user.name=defectops", "-c", "user.email=defectops@localhost", "-c", "commit.gpgsign=false")


class VersioningError(RuntimeError):
    """A git or DVC step failed; the message names the command, the folder and DVC's own error line."""


@dataclass(frozen=True)
class DataVersion:
    """The exact data of one retrain: where it lies, its DVC hash, its remote copy and its test-split digest."""

    line: str
    path: str  # the versioned workspace copy (train/, test/, ground_truth/)
    dvc_file: str
    dvc_md5: str  # "<md5>.dir" as written in the .dvc file
    remote_path: str
    registry_commit: str
    n_files: int
    size: int
    eval_data_hash: str  # LineSplit digest of the test split only (the pinned evaluation data)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ commands

def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DVC_SITE_CACHE_DIR", str(Path(env.get("TMPDIR", "/tmp")) / "dvc-site-cache"))
    env.update(extra or {})
    return env


def dvc_executable() -> str:
    local = Path(sys.executable).parent / "dvc"
    found = str(local) if local.exists() else shutil.which("dvc")
    if not found:
        raise VersioningError(f"dvc not found next to {sys.executable} nor on PATH: pip install -c constraints.txt -e .")
    return found


def _run(argv: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VersioningError(f"`{' '.join(argv[:3])}` in {cwd}: no answer after {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-3:]
        name = Path(argv[0]).name
        raise VersioningError(f"`{name} {' '.join(argv[1:3])}` failed in {cwd} (exit {proc.returncode}): "
                              + " | ".join(errors))
    return proc.stdout


def _git(repo: Path, *args: str) -> str:
    return _run(["git", *_GIT_IDENTITY, *args], repo)


def _dvc(repo: Path, *args: str, timeout: float = 600) -> str:
    return _run([dvc_executable(), *args], repo, timeout=timeout)


# ------------------------------------------------------------------------------------------------ code

def code_dir(path: str | Path | None = None) -> Path:
    """The code checkout whose commit is recorded: `path`, else DEFECTOPS_CODE_DIR, else this project."""
    return Path(path or os.environ.get("DEFECTOPS_CODE_DIR") or Path(__file__).resolve().parents[1])


def git_out(folder: Path, *args: str, timeout: float = 30) -> tuple[int, str]:
    """(exit code, stripped stdout, or stderr when it failed) of `git -C folder ARGS`; -1 when git could not
    run or timed out."""
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return out.returncode, (out.stdout if out.returncode == 0 else out.stderr).strip()


def git_commit(path: str | Path | None = None) -> str:
    """`git rev-parse HEAD` of the code checkout (see `code_dir`); "none" with a warning when it is not a
    git checkout or has no commit yet."""
    folder = code_dir(path)
    rc, commit = git_out(folder, "rev-parse", "--verify", "-q", "HEAD")
    if rc != 0 or not commit:
        logger.warning("%s is not a git checkout with a commit: git commit recorded as %r", folder, NO_COMMIT)
        return NO_COMMIT
    return commit


def git_dirty(path: str | Path | None = None) -> str:
    """"true" when the code checkout has uncommitted changes to tracked files, "false", or "unknown"."""
    folder = code_dir(path)
    if git_out(folder, "rev-parse", "--verify", "-q", "HEAD")[0] != 0:
        return "unknown"
    rc, out = git_out(folder, "status", "--porcelain", "--untracked-files=no")
    return "unknown" if rc != 0 else ("true" if out else "false")


# ------------------------------------------------------------------------------------------------ registry

@contextmanager
def registry_lock(registry: Path) -> Iterator[None]:
    """One writer at a time per registry (parallel retrains of several lines share its git index)."""
    registry.parent.mkdir(parents=True, exist_ok=True)
    with open(registry.parent / f".{registry.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_registry(registry: Path, bucket: str) -> Path:
    """git init + dvc init + the `store` remote at s3://<bucket>/dvc, committed once."""
    registry.mkdir(parents=True, exist_ok=True)
    if not (registry / ".git").is_dir():
        _git(registry, "init", "-q")
    if not (registry / ".dvc").is_dir():
        _dvc(registry, "init", "-q")
    url = f"s3://{bucket}/dvc"
    config = configparser.ConfigParser()
    config.read(registry / ".dvc" / "config")
    if config.get(f'remote "{REMOTE}"', "url", fallback=None) != url:
        _dvc(registry, "remote", "add", "-f", "-d", REMOTE, url)
    _git(registry, "add", ".dvc/config", ".dvcignore")
    _commit_if_staged(registry, f"registry: remote {url}")
    return registry


def write_remote_credentials(registry: Path, endpoint: str, access_key: str, secret_key: str) -> None:
    """`.dvc/config.local` (git-ignored by DVC, mode 0600): endpoint and keys of the `store` remote."""
    path = registry / ".dvc" / "config.local"
    text = (f"['remote \"{REMOTE}\"']\n    endpointurl = {endpoint}\n"
            f"    access_key_id = {access_key}\n    secret_access_key = {secret_key}\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _commit_if_staged(repo: Path, message: str) -> bool:
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo, capture_output=True)
    if staged.returncode == 0 and _has_head(repo):
        return False
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return True


def _has_head(repo: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=repo,
                          capture_output=True).returncode == 0


PUSH_TIMEOUT_ENV = "DEFECTOPS_DVC_PUSH_TIMEOUT_S"
PUSH_TIMEOUT_S = 300.0


def push_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds one `dvc push` may take: DEFECTOPS_DVC_PUSH_TIMEOUT_S, else 300 (a hung store fails then)."""
    text = (os.environ if env is None else env).get(PUSH_TIMEOUT_ENV, "").strip()
    if not text:
        return PUSH_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise ValueError(f"{PUSH_TIMEOUT_ENV}={text!r}: expected seconds, more than 0 and less than a day")
    return value


def push(registry: Path, target: str, attempts: int = 2, delay_s: float = 3.0, timeout_s: float | None = None) -> None:
    """`dvc push` of one .dvc file to the `store` remote; the network step, so retried once; each attempt
    bounded by `timeout_s` (default: push_timeout_s())."""
    timeout = push_timeout_s() if timeout_s is None else timeout_s
    for attempt in range(1, attempts + 1):
        try:
            _dvc(registry, "push", "-q", "-r", REMOTE, target, timeout=timeout)
            return
        except VersioningError as exc:
            if attempt == attempts:
                raise
            logger.warning("dvc push failed (attempt %d of %d), retrying in %.0f s: %s", attempt, attempts,
                           delay_s, exc)
            time.sleep(delay_s)


# ------------------------------------------------------------------------------------------------ data

def stage_line(source: Path, dest: Path, max_train_images: int | None = None) -> int:
    """Copy the images a retrain uses from `source` (MVTec layout) to `dest`, replacing it. Returns files."""
    split = scan_line(source)
    train = split.train[:max_train_images] if max_train_images else split.train
    files = [s.path for s in (*train, *split.test)] + [s.mask_path for s in split.test if s.mask_path]
    tmp = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in files:
        target = tmp / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return len(files)


def read_dvc_file(dvc_file: Path) -> dict:
    """The single `outs` entry of a `.dvc` file: {md5, size, nfiles, path}."""
    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        return dict(outs[0])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise VersioningError(f"{dvc_file}: not a readable .dvc file ({type(exc).__name__}: {exc})") from None


def remote_path(bucket: str, md5: str) -> str:
    """Where DVC 3 keeps an object on an s3 remote: files/md5/<first 2 hex>/<rest>."""
    return f"s3://{bucket}/dvc/files/md5/{md5[:2]}/{md5[2:]}"


def eval_data_hash(root: Path) -> str:
    """Digest of the test split alone (paths relative to root + bytes of images and masks)."""
    split = scan_line(root)
    return LineSplit(split.root, (), split.test).digest()


def snapshot(workspace: Path, dest: Path) -> Path:
    """A private view of the versioned files for one run: hard links (a copy across file systems), so a
    later re-staging of the line (new files, new inodes) never changes what a running retrain reads."""
    shutil.rmtree(dest, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(workspace, dest, copy_function=link)
    return dest


def version_line(line: str, source: Path, registry: Path, max_train_images: int | None = None,
                 env: Mapping[str, str] | None = None, snapshot_to: Path | None = None) -> DataVersion:
    """Stage the line's data in the registry, `dvc add` it, commit the .dvc file and `dvc push` it.
    With `snapshot_to`, the returned `path` is a private snapshot of the versioned files (see `snapshot`)."""
    env = dict(os.environ if env is None else env)
    bucket = env["DEFECTOPS_BUCKET"]
    with registry_lock(registry):
        ensure_registry(registry, bucket)
        write_remote_credentials(registry, env["DEFECTOPS_S3_ENDPOINT"],
                                 env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", ""))
        workspace = registry / "lines" / line
        workspace.parent.mkdir(parents=True, exist_ok=True)
        n = stage_line(Path(source), workspace, max_train_images)
        _dvc(registry, "add", "-q", f"lines/{line}")
        dvc_file = registry / "lines" / f"{line}.dvc"
        out = read_dvc_file(dvc_file)
        _git(registry, "add", f"lines/{line}.dvc", "lines/.gitignore")
        _commit_if_staged(registry, f"data: {line} {out['md5']}")
        commit = _git(registry, "rev-parse", "HEAD").strip()
        push(registry, f"lines/{line}.dvc")
        data_path = snapshot(workspace, Path(snapshot_to)) if snapshot_to else workspace
    logger.info("versioned %s: %d files, %s pushed to %s", line, n, out["md5"], remote_path(bucket, out["md5"]))
    return DataVersion(line=line, path=str(data_path), dvc_file=str(dvc_file), dvc_md5=str(out["md5"]),
                       remote_path=remote_path(bucket, str(out["md5"])), registry_commit=commit,
                       n_files=int(out.get("nfiles", n)), size=int(out.get("size", 0)),
                       eval_data_hash=eval_data_hash(data_path))
