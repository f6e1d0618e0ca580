"""What must hold after every fault: nothing in the object store lost or changed, every registered version's
bank present with matching sha256s, @champion on an existing version whose objects verify, and no
registered model whose loading would unpickle anything.

    before = snapshot(state)
    ...inject a fault, re-run...
    report = check(state, "defectops-line", before)
    assert report.ok, report.problems

Also checked (issue 16): every object's bytes match its `sha256` metadata and the sha256 in its key
(`<prefix>/<sha256>/<name>`), so a bit flipped under intact metadata is a problem; with `settled=(line, root)`
(after a clean re-run) no run of the line is left RUNNING and no `work/<run_id>` folder is left behind;
`orphans(store, line)` lists the line's model objects no registered version references (what `defectops gc`
would remove): none after an identical re-run of a killed retrain, which reuses the killed run's upload.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import boto3
from botocore.config import Config

from flows import registry, tracking
from infra.storage import ObjectStore, StorageError


def _s3(state):
    return boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=state.access_key, aws_secret_access_key=state.secret_key,
                        config=Config(connect_timeout=5, read_timeout=60, retries={"total_max_attempts": 3}))


_SHA_PART = re.compile(r"/([0-9a-f]{64})/[^/]+$")


def metadata_mismatches(state, hashes: dict[str, str]) -> list[str]:
    """Objects (of a deep snapshot) whose bytes differ from their `sha256` metadata or from the sha256 in
    their key."""
    s3, bad = _s3(state), []
    for key, digest in hashes.items():
        meta = s3.head_object(Bucket=state.bucket, Key=key).get("Metadata", {}).get("sha256")
        in_key = _SHA_PART.search(key)
        if meta is not None and meta != digest:
            bad.append(f"{key}: bytes hash to {digest[:12]}, metadata says {meta[:12]}")
        elif in_key and meta is not None and in_key.group(1) != digest:
            bad.append(f"{key}: bytes hash to {digest[:12]}, the key says {in_key.group(1)[:12]}")
    return bad


def settled_problems(line: str, root) -> list[str]:
    """After a clean re-run of `line`: runs of it still RUNNING, `work/<run_id>` folders left under `root`."""
    client = tracking.client()
    found = client.get_experiment_by_name(tracking.experiment_name(line))
    running = [] if found is None else client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")
    problems = [f"run {r.info.run_id} of {line} still RUNNING" for r in running]
    work = root / "work"
    problems += [f"work folder {p} left behind" for p in (sorted(work.iterdir()) if work.is_dir() else [])]
    return problems


def orphans(store: ObjectStore, line: str) -> list[str]:
    """Objects under models/<line>/ that no registered version references (flows.gc's dry run)."""
    from flows.gc import collect

    return collect(store, min_age_s=0, prefixes=(f"models/{line}/",))["unreferenced"]


def snapshot(state, deep: bool = True) -> dict[str, str]:
    """{key: sha256 of the object's bytes} of every object in the bucket (listed, then read and hashed);
    deep=False: {key: "ETag:size"} from the listing alone (one request per 1000 objects)."""
    s3, out = _s3(state), {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=state.bucket):
        for item in page.get("Contents", []):
            if not deep:
                out[item["Key"]] = f"{item['ETag']}:{item['Size']}"
                continue
            digest = hashlib.sha256()
            for chunk in s3.get_object(Bucket=state.bucket, Key=item["Key"])["Body"].iter_chunks(1 << 20):
                digest.update(chunk)
            out[item["Key"]] = digest.hexdigest()
    return out


@dataclass
class Report:
    lost: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    versions: int = 0
    champion: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.lost or self.changed or self.problems)


def check_registry(store: ObjectStore, name: str, report: Report) -> None:
    """Every version: bank tags present, manifest and every file verify; MLmodel is code, not pickle.
    @champion, when set, names one of those versions."""
    versions = registry.list_versions(name)
    report.versions = len(versions)
    for info in versions:
        label, tags = f"{name} v{info['version']}", info["tags"]
        if not tags.get("bank_uri") or not tags.get("bank_sha256"):
            report.problems.append(f"{label}: no bank_uri/bank_sha256")
            continue
        try:
            files = store.verify_dir(tags["bank_uri"], tags["bank_sha256"])
        except StorageError as exc:
            report.problems.append(f"{label}: bank {tags['bank_uri']}: {exc.reason}")
            continue
        bad = [rel for rel, ok in files.items() if not ok]
        if bad or not files:
            report.problems.append(f"{label}: bank files missing or changed: {bad or 'none listed'}")
        try:
            registry.check_no_pickle({"flavors": _flavors(name, info["version"])}, label)
        except Exception as exc:  # noqa: BLE001 - any failure to read the model is a problem to report
            report.problems.append(f"{label}: model artifact: {type(exc).__name__}: {exc}")
    report.champion = registry.version_for_alias(name, "champion")
    if report.champion is not None and report.champion not in {v["version"] for v in versions}:
        report.problems.append(f"{name}@champion -> {report.champion}: no such version")


def _flavors(name: str, version: str) -> dict:
    import mlflow

    return mlflow.models.get_model_info(f"models:/{name}/{version}").flavors


def check(state, name: str, before: dict[str, str] | None = None, settled: tuple | None = None) -> Report:
    """The invariants after a fault (services must be up again): see the module docstring. settled: (line,
    services root of the clients) after a clean re-run."""
    report = Report()
    store = ObjectStore(state.s3_endpoint, state.bucket, state.access_key, state.secret_key)
    deep = before is None or not all(":" in v for v in before.values())
    after = snapshot(state, deep=deep)
    if before is not None:
        report.lost = sorted(set(before) - set(after))
        report.changed = sorted(k for k in before if k in after and after[k] != before[k])
    if deep:
        report.problems += metadata_mismatches(state, after)
    check_registry(store, name, report)
    if settled is not None:
        report.problems += settled_problems(*settled)
    return report
