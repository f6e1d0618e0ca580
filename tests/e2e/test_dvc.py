"""Data and code versioning (flows.versioning) and the DVC stages of dvc.yaml.

- code version: "none" with a warning outside a git checkout, the real commit inside one;
- the demo line is byte-for-byte reproducible (so its DVC hash is stable);
- version_line against a real SeaweedFS: .dvc hash, remote object, credentials kept out of git;
- dvc.yaml: `dvc repro`, `dvc metrics show`, `dvc exp run -S` in a scratch git repository (slow).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from components.data import LineSplit, scan_line
from flows.demo_data import DemoSpec, build_demo_line
from flows.versioning import (
    NO_COMMIT,
    eval_data_hash,
    git_commit,
    git_dirty,
    read_dvc_file,
    stage_line,
    version_line,
)
from infra.services import env_for_clients
from tests.e2e._pipeline import SMALL_DEMO, git_head, tiny_git_repo

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_git_commit_none_without_a_commit(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flows.versioning"):
        assert git_commit(tmp_path) == NO_COMMIT
    assert "not a git checkout with a commit" in caplog.text
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert git_commit(tmp_path) == NO_COMMIT and git_dirty(tmp_path) == "unknown"  # initialised, no commit
    commit = tiny_git_repo(tmp_path)
    assert git_commit(tmp_path) == commit == git_head(tmp_path) and len(commit) == 40
    assert git_dirty(tmp_path) == "false"
    (tmp_path / "README").write_text("changed\n")
    assert git_dirty(tmp_path) == "true"


def test_demo_line_is_reproducible(tmp_path):
    a = build_demo_line(tmp_path / "a", SMALL_DEMO)
    b = build_demo_line(tmp_path / "b", SMALL_DEMO)
    assert _files(a) == _files(b)
    assert _files(build_demo_line(tmp_path / "c", DemoSpec(**{**SMALL_DEMO.__dict__, "seed": 1}))) != _files(a)
    split = scan_line(a)
    assert split.defect_types == ("blob", "missing", "scratch")
    assert len(split.train) == SMALL_DEMO.n_train
    defective = [s for s in split.test if s.label == 1]
    assert len(defective) == 3 * SMALL_DEMO.n_per_defect and all(s.mask_path for s in defective)


def test_stage_line_copies_the_exact_subset(tmp_path):
    source = build_demo_line(tmp_path / "src", SMALL_DEMO)
    n = stage_line(source, tmp_path / "staged", max_train_images=3)
    staged = scan_line(tmp_path / "staged")
    assert [s.path.name for s in staged.train] == [s.path.name for s in scan_line(source).train[:3]]
    assert n == 3 + len(staged.test) + sum(1 for s in staged.test if s.mask_path)
    assert not (tmp_path / "staged" / "demo.json").exists()  # only what a retrain reads
    src = scan_line(source)
    assert eval_data_hash(tmp_path / "staged") == LineSplit(src.root, (), src.test).digest()


def test_version_line_pushes_to_the_object_store(object_store, tmp_path, monkeypatch):
    for key, value in {**env_for_clients(object_store), "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
                       "TMPDIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    source, registry = build_demo_line(tmp_path / "src", SMALL_DEMO), tmp_path / "registry"
    first = version_line("line-a", source, registry, max_train_images=4)
    assert first.dvc_md5 == read_dvc_file(registry / "lines" / "line-a.dvc")["md5"]
    again = version_line("line-a", source, registry, max_train_images=4)
    assert (again.dvc_md5, again.registry_commit) == (first.dvc_md5, first.registry_commit)  # no new commit
    snap = tmp_path / "run" / "data"
    more = version_line("line-a", source, registry, max_train_images=5, snapshot_to=snap)
    assert more.dvc_md5 != first.dvc_md5 and more.registry_commit != first.registry_commit
    assert Path(more.path) == snap and len(scan_line(snap).train) == 5
    version_line("line-a", source, registry, max_train_images=2)  # re-staging leaves the snapshot alone
    assert len(scan_line(snap).train) == 5 and len(scan_line(registry / "lines" / "line-a").train) == 2
    assert more.eval_data_hash == first.eval_data_hash  # same pinned test split
    s3 = boto3.client("s3", endpoint_url=object_store.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=object_store.access_key, aws_secret_access_key=object_store.secret_key)
    for version in (first, more):
        bucket, key = version.remote_path[5:].split("/", 1)
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.md5(body).hexdigest() == version.dvc_md5.removesuffix(".dir")
    local = registry / ".dvc" / "config.local"
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    tracked = subprocess.run(["git", "ls-files"], cwd=registry, capture_output=True, text=True, check=True).stdout
    assert ".dvc/config.local" not in tracked and "lines/line-a.dvc" in tracked
    assert object_store.secret_key not in (registry / ".dvc" / "config").read_text()


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(repo.parent / "dvc-site"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_dvc_repro_and_experiment(tmp_path):
    repo = tmp_path / "proj"
    repo.mkdir()
    shutil.copy(PROJECT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())  # the project's file, smaller images
    params["data"].update(image_size=[64, 64], batch_size=8)
    params["detector"]["patchcore"]["coreset_ratio"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ident = ["-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *ident, "commit", "-q", "-m", "init"], cwd=repo, check=True)

    _dvc(repo, "repro")
    report = json.loads((repo / "metrics" / "evaluation.json").read_text())
    assert 0.5 < report["overall"]["image_auroc"] <= 1.0
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    assert "metrics/summary.json" in json.dumps(shown) and "image_auroc" in json.dumps(shown)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["fit"]["params"]["params.yaml"]["detector.patchcore.coreset_ratio"] == 0.1
    plots = json.loads(_dvc(repo, "plots", "show", "--json"))
    assert {"plots/roc.csv", "plots/pro.csv"} <= set(json.dumps(plots).replace('"', " ").split()), plots
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *ident, "commit", "-q", "-m", "baseline"], cwd=repo, check=True)

    _dvc(repo, "exp", "run", "-S", "detector.patchcore.coreset_ratio=0.05")
    diff = json.loads(_dvc(repo, "params", "diff", "--json"))
    change = diff["params.yaml"]["detector.patchcore.coreset_ratio"]
    assert (change["old"], change["new"]) == (0.1, 0.05)
    assert json.loads((repo / "metrics" / "evaluation.json").read_text())["model"] == "models/line"
    exps = json.dumps(json.loads(_dvc(repo, "exp", "show", "--json")))
    assert "0.05" in exps and "image_auroc" in exps
    header = _dvc(repo, "exp", "show", "--only-changed", "--csv").splitlines()[0].split(",")
    assert "detector.patchcore.coreset_ratio" in header and "image_auroc" in header
    assert len(header) <= 30, f"`dvc exp show --only-changed` lists {len(header)} columns: {header}"
