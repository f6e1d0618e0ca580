"""The reliability table of docs/reliability.md from the JSON a reliability run writes.

    DEFECTOPS_RELIABILITY_JSON=reliability.json .venv/bin/pytest -q -m '' tests/reliability
    .venv/bin/python -m tests.reliability.table reliability.json          # markdown table (several: merged)
    .venv/bin/python -m tests.reliability.table reliability.json --cases  # one row per case

A case counts as survived only when its test passed; lost / corrupted are the objects (stored objects, or
the files of the previous model for bad input) found missing or changed after the case, counted before the
test's assertions, so a failing run still reports them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = ("bad input", "fuzz", "fault", "re-run", "security")
HEAD = {"bad input": "bad input (CLI: refused with file + reason, nothing stored; or accepted)",
        "fuzz": "hypothesis: images, masks, params.yaml, --set (examples per property)",
        "fault": "faults injected (store, MLflow, SIGKILL, disk, concurrency, bounds)",
        "re-run": "clean re-run of the retrain after a fault",
        "security": "security checks (pickle, names, credentials, loopback, signatures, bit flips)"}


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    for kind in KINDS:
        mine = [r for r in records if r["kind"] == kind]
        if mine:
            rows.append({"kind": kind, "tried": len(mine), "survived": sum(r["outcome"] == "passed" for r in mine),
                         "lost": sum(r["lost"] for r in mine), "corrupted": sum(r["corrupted"] for r in mine)})
    return rows


def markdown(payload: dict, cases: bool = False) -> str:
    records = payload["records"]
    rows = summarise(records)
    out = ["| what | cases tried | passed / survived | objects lost | objects corrupted |", "|---|---|---|---|---|"]
    out += [f"| {HEAD[r['kind']]} | {r['tried']} | {r['survived']} | {r['lost']} | {r['corrupted']} |" for r in rows]
    total = {k: sum(r[k] for r in rows) for k in ("tried", "survived", "lost", "corrupted")}
    out.append(f"| **total** | **{total['tried']}** | **{total['survived']}** | **{total['lost']}** | "
               f"**{total['corrupted']}** |")
    if payload.get("failed_without_record"):
        out.append(f"\nFailed before recording: {', '.join(payload['failed_without_record'])}")
    if cases:
        out += ["", "| kind | case | outcome | lost | corrupted |", "|---|---|---|---|---|"]
        out += [f"| {r['kind']} | {r['case']} | {r['outcome']} | {r['lost']} | {r['corrupted']} |" for r in records]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="one or more summaries (e.g. default + slow runs)")
    parser.add_argument("--cases", action="store_true", help="also list every case")
    args = parser.parse_args(argv)
    parts = [json.loads(path.read_text()) for path in args.json]
    payload = {"records": [r for p in parts for r in p["records"]],
               "failed_without_record": [n for p in parts for n in p.get("failed_without_record", [])]}
    print(markdown(payload, args.cases))
    rows = summarise(payload["records"])
    bad = any(r["lost"] or r["corrupted"] or r["survived"] != r["tried"] for r in rows)
    return 1 if bad or payload.get("failed_without_record") else 0


if __name__ == "__main__":
    sys.exit(main())
