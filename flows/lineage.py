"""Lineage audit of a registered version: where its data, code, parameters, weights and bank came from,
how it scored, and why it was (not) promoted. The bank is re-verified against the object store now: the
manifest object and every file it lists are downloaded again and hashed.

    info = lineage("defectops-cookie", "@champion", store)     # or "3"
    print(render(info)); json.dumps(info)

Lookup errors are LineageError naming the model and the ref.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from flows import registry, tracking
from flows.promote import metrics_from_tags
from infra.storage import (
    ChecksumError,
    ManifestError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
)

logger = logging.getLogger(__name__)

LINEAGE_TAGS = ("git_commit", "git_dirty", "dvc_data_hash", "dvc_remote_path", "params_hash", "weights_sha256",
                "bank_uri", "bank_sha256", "eval_data_hash", "product_line", "method")


class LineageError(LookupError):
    """The model, version or alias cannot be found; the message names the model and the ref."""


def parse_model_ref(text: str) -> tuple[str, str]:
    """"defectops-cookie@champion" -> (name, "@champion"); "defectops-cookie/3" or "...@3" -> (name, "3")."""
    text = text.strip()
    if "@" in text:
        name, _, ref = text.rpartition("@")
        ref = ref if ref.isdigit() else f"@{ref}"
    elif "/" in text:
        name, _, ref = text.rpartition("/")
    else:
        raise LineageError(f"{text!r}: expected MODEL@ALIAS or MODEL/VERSION (e.g. defectops-cookie@champion)")
    if not name or not ref.lstrip("@"):
        raise LineageError(f"{text!r}: expected MODEL@ALIAS or MODEL/VERSION (e.g. defectops-cookie@champion)")
    return name, ref


def verify_bank(store: ObjectStore, uri: str, sha256: str) -> dict[str, Any]:
    """Re-download and hash the bank's manifest and every file it lists.

    -> {uri, sha256, verified: True | False | None (store unreachable), files: {relpath: bool},
        problem: str | None, checked_at}."""
    out: dict[str, Any] = {"uri": uri, "sha256": sha256, "verified": None, "files": {}, "problem": None,
                           "checked_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        out["files"] = store.verify_dir(uri, sha256)
    except ChecksumError as exc:
        out.update(verified=False, problem=f"manifest changed: {exc.reason}")
        return out
    except ObjectNotFoundError:
        out.update(verified=False, problem="manifest object missing from the store")
        return out
    except ManifestError as exc:
        out.update(verified=False, problem=f"manifest unreadable ({exc.reason})")
        return out
    except StorageError as exc:
        out["problem"] = f"could not verify: {exc}"
        return out
    bad = [rel for rel, ok in out["files"].items() if not ok]
    out["verified"] = not bad
    if bad:
        out["problem"] = f"{len(bad)} file(s) changed or missing: {', '.join(bad)}"
    return out


def lineage(model_name: str, ref: str, store: ObjectStore) -> dict[str, Any]:
    """The full chain of one version (ref "@alias" or a version number) as a JSON-serialisable dict."""
    try:
        info = registry.get_version(model_name, ref)
        run = tracking.get_run(info["run_id"]) if info.get("run_id") else None
    except tracking.RegistryError as exc:
        raise LineageError(f"lineage of {model_name} {ref}: {exc}") from None
    tags = info["tags"]
    missing = [key for key in LINEAGE_TAGS if not tags.get(key)]
    if tags.get("bank_uri") and tags.get("bank_sha256"):
        bank = verify_bank(store, tags["bank_uri"], tags["bank_sha256"])
    else:
        bank = {"uri": tags.get("bank_uri"), "sha256": tags.get("bank_sha256"), "verified": False, "files": {},
                "problem": "the version records no bank_uri/bank_sha256", "checked_at": None}
    reasons = tags.get("promotion.reasons")
    try:
        reasons = json.loads(reasons) if reasons else []
    except json.JSONDecodeError:
        reasons = [reasons]
    return {
        "model": model_name, "ref": ref, "version": info["version"], "aliases": info["aliases"],
        "product_line": tags.get("product_line"), "method": tags.get("method"),
        "run": {"run_id": info.get("run_id"), "experiment": run["experiment"] if run else None,
                "status": run["status"] if run else None},
        "data": {"dvc_data_hash": tags.get("dvc_data_hash"), "dvc_remote_path": tags.get("dvc_remote_path"),
                 "eval_data_hash": tags.get("eval_data_hash")},
        "code": {"git_commit": tags.get("git_commit"), "git_dirty": tags.get("git_dirty")},
        "params_hash": tags.get("params_hash"), "params": dict(sorted((run or {}).get("params", {}).items())),
        "weights_sha256": tags.get("weights_sha256"), "bank": bank,
        "metrics": {k: (None if v != v else v) for k, v in sorted(metrics_from_tags(tags).items())},
        "promotion": {"decision": tags.get("promotion.decision"), "time": tags.get("promotion.time"),
                      "champion_before": tags.get("promotion.champion_before"), "reasons": reasons},
        "export": _export_info(tags, store),
        "missing_tags": missing,
    }


def _export_info(tags: dict[str, str], store: ObjectStore) -> dict[str, Any]:
    """The version's ONNX / OpenVINO export (docs/export.md): status, formats, reason; re-verified like the
    bank when one is registered."""
    out: dict[str, Any] = {"status": tags.get("export.status"), "formats": tags.get("export.formats"),
                           "reason": tags.get("export.reason"), "uri": None, "verified": None}
    if tags.get("export.uri") and tags.get("export.sha256"):
        out.update(verify_bank(store, tags["export.uri"], tags["export.sha256"]))
    return out


def _bank_line(bank: dict[str, Any]) -> str:
    if bank["verified"] is True:
        return f"VERIFIED against the store at {bank['checked_at']} ({len(bank['files'])} files)"
    if bank["verified"] is None:
        return f"NOT CHECKED: {bank['problem']}"
    return f"MISMATCH: {bank['problem']}"


def render(info: dict[str, Any]) -> str:
    """A readable text block of `lineage(...)`."""
    dash = "-"
    rows = [f"{info['model']} {info['ref']}  ->  version {info['version']}  "
            f"(aliases: {', '.join('@' + a for a in info['aliases']) or 'none'})",
            f"  product line   {info['product_line'] or dash}   method {info['method'] or dash}",
            f"  run            {info['run']['run_id'] or dash}  ({info['run']['experiment'] or dash}, "
            f"{info['run']['status'] or dash})",
            f"  data           dvc {info['data']['dvc_data_hash'] or dash}",
            f"                 at {info['data']['dvc_remote_path'] or dash}",
            f"  eval data      {info['data']['eval_data_hash'] or dash}",
            f"  code           git {info['code']['git_commit'] or dash}  (dirty: {info['code']['git_dirty'] or dash})",
            f"  weights        sha256 {info['weights_sha256'] or dash}",
            f"  bank           {info['bank']['uri'] or dash}",
            f"                 sha256 {info['bank']['sha256'] or dash}",
            f"                 {_bank_line(info['bank'])}"]
    metrics = info["metrics"]
    head = [k for k in ("image_auroc", "pixel_auroc", "aupro", "ms_per_image") if k in metrics]
    rows.append("  metrics        " + ("  ".join(f"{k} {_num(metrics[k])}" for k in head) or dash))
    op_line = _operating_point_line(metrics)
    rows += [f"  operating pt   {op_line}"] if op_line else []
    rest = [k for k in metrics if k not in head and not (op_line and k in _OP_KEYS)]
    rows += [f"                   {k} = {_num(metrics[k])}" for k in rest]
    promo = info["promotion"]
    rows.append(f"  promotion      {promo['decision'] or 'not gated'}"
                + (f" at {promo['time']}" if promo["time"] else "")
                + (f" (champion before: {promo['champion_before']})" if promo.get("champion_before") else ""))
    rows += [f"                   - {reason}" for reason in promo["reasons"]]
    export = info.get("export") or {}
    rows.append(f"  export         {export.get('status') or 'none'}  {export.get('formats') or ''}".rstrip())
    if export.get("uri"):
        rows += [f"                 {export['uri']}", f"                 {_bank_line(export)}"]
    if export.get("reason"):
        rows.append(f"                 {export['reason']}")
    rows.append(f"  params         hash {info['params_hash'] or dash}, {len(info['params'])} logged")
    rows += [f"                   {k} = {v}" for k, v in info["params"].items()]
    if info["missing_tags"]:
        rows.append(f"  MISSING TAGS   {', '.join(info['missing_tags'])}")
    return "\n".join(rows)


_OP_KEYS = ("false_reject_rate", "false_reject_rate_lower", "false_reject_rate_upper", "n_false_rejects", "n_good",
            "escape_rate", "escape_rate_lower", "escape_rate_upper", "n_escapes", "n_defective",
            "calibration_frr_upper_bound")


def _operating_point_line(m: dict[str, Any]) -> str | None:
    """'false rejects 0/14 = 0.0% (95% CI 0.0-23.2%), escapes 19/32 = ...' from the version's metric tags."""
    if m.get("false_reject_rate") is None or m.get("n_good") is None:
        return None

    def part(label: str, key: str, hits: str, total: str) -> str:
        if m.get(key) is None or m.get(total) is None:
            return f"{label} -"
        return (f"{label} {int(m[hits])}/{int(m[total])} = {100 * m[key]:.1f}% (95% CI "
                f"{100 * (m.get(key + '_lower') or 0):.1f}-{100 * (m.get(key + '_upper') or 0):.1f}%)")

    bound = m.get("calibration_frr_upper_bound")
    return (part("false rejects", "false_reject_rate", "n_false_rejects", "n_good") + ", "
            + part("escapes", "escape_rate", "n_escapes", "n_defective")
            + (f", calibration FRR bound {100 * bound:.1f}%" if bound is not None else ""))


def _num(value: Any) -> str:
    return "nan" if value is None else f"{value:.4f}"
