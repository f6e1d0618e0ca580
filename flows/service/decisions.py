"""Every decision of the inference service, operator feedback on it, and the export of reviewed false
alarms into a line's training data.

Where: one SQLite file, `<services.root>/serving/decisions.sqlite`, in WAL mode, so the monitoring of the
next issue (or `sqlite3`, pandas) reads it while the service writes, without a server and without a round
trip to the object store on the request path; writes are one short transaction per request. Kept images
live beside it, content-addressed: `<root>/serving/images/<sha[:2]>/<sha256><ext>` (the bytes as received).
Schema (PRAGMA user_version 1):

    decisions(id, time UTC ISO-8601, line, alias, model_name, model_version, score, normalised_score,
              threshold, decision, image_sha256, image_name, image_ext, image_kept, latency_ms)
    feedback(id, decision_id -> decisions.id, label false_alarm|missed_defect, note, time,
             state pending|accepted|rejected, reviewed_time, exported_path)

A single host's file: for several service replicas, ship the rows elsewhere (the table is the contract).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA_VERSION = 1
LABELS = ("false_alarm", "missed_defect")
VERDICTS = ("accepted", "rejected")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  time TEXT NOT NULL, line TEXT NOT NULL, alias TEXT NOT NULL, model_name TEXT NOT NULL,
  model_version TEXT NOT NULL, score REAL NOT NULL, normalised_score REAL, threshold REAL,
  decision TEXT NOT NULL, image_sha256 TEXT NOT NULL, image_name TEXT, image_ext TEXT,
  image_kept INTEGER NOT NULL DEFAULT 0, latency_ms REAL);
CREATE INDEX IF NOT EXISTS decisions_line_time ON decisions(line, time);
CREATE TABLE IF NOT EXISTS feedback (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  decision_id INTEGER NOT NULL REFERENCES decisions(id),
  label TEXT NOT NULL CHECK (label IN ('false_alarm', 'missed_defect')), note TEXT, time TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'accepted', 'rejected')),
  reviewed_time TEXT, exported_path TEXT);
CREATE INDEX IF NOT EXISTS feedback_state ON feedback(state);
"""
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}


class ReviewError(LookupError):
    """An unknown decision or feedback id, or a request that does not fit its state; names the id."""


@dataclass(frozen=True)
class Decision:
    line: str
    alias: str
    model_name: str
    model_version: str
    score: float
    normalised_score: float | None
    threshold: float | None
    decision: str
    image_sha256: str
    image_name: str
    latency_ms: float


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def extension_for(image_format: str | None) -> str:
    """Pillow format name -> file extension of a kept image (".img" when unknown)."""
    return _EXTENSIONS.get((image_format or "").upper(), ".img")


class DecisionStore:
    """The SQLite file and the kept images (see the module docstring); safe to share between threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "decisions.sqlite"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------ images
    def image_path(self, sha256: str, ext: str) -> Path:
        return self.images / sha256[:2] / f"{sha256}{ext}"

    def keep_image(self, data: bytes, sha256: str, ext: str) -> Path:
        """Write the bytes once (atomically) under their sha256; returns the path."""
        path = self.image_path(sha256, ext)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path

    def read_image(self, decision_id: int) -> tuple[bytes, str]:
        """(bytes, extension) of a decision's kept image, sha256 re-checked; ReviewError when not kept."""
        row = self.decision(decision_id)
        if not row["image_kept"]:
            raise ReviewError(f"decision {decision_id}: its image was not kept (service.keep_images)")
        path = self.image_path(row["image_sha256"], row["image_ext"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ReviewError(f"decision {decision_id}: kept image {path} cannot be read ({exc})") from None
        if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
            raise ReviewError(f"decision {decision_id}: kept image {path} does not match its sha256")
        return data, row["image_ext"]

    # ------------------------------------------------------------------------------------------ decisions
    def record(self, decisions: Sequence[Decision], kept: Sequence[str | None]) -> list[int]:
        """Insert decisions in one transaction; kept[i] is the extension of a kept image or None."""
        rows = [(now(), d.line, d.alias, d.model_name, d.model_version, d.score, d.normalised_score,
                 d.threshold, d.decision, d.image_sha256, d.image_name, ext, int(ext is not None), d.latency_ms)
                for d, ext in zip(decisions, kept, strict=True)]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                ids = [self._db.execute(
                    "INSERT INTO decisions (time, line, alias, model_name, model_version, score, "
                    "normalised_score, threshold, decision, image_sha256, image_name, image_ext, image_kept, "
                    "latency_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row).lastrowid for row in rows]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [int(i) for i in ids]

    def decision(self, decision_id: int) -> sqlite3.Row:
        with self._lock:
            row = self._db.execute("SELECT * FROM decisions WHERE id = ?", (decision_id,)).fetchone()
        if row is None:
            raise ReviewError(f"decision {decision_id}: no such decision")
        return row

    def recent(self, line: str | None = None, limit: int = 50) -> list[dict]:
        """The latest decisions, newest first, each with its latest feedback (label, state) if any."""
        query = ("SELECT d.*, f.id AS feedback_id, f.label AS feedback, f.state AS feedback_state "
                 "FROM decisions d LEFT JOIN feedback f ON f.id = (SELECT MAX(id) FROM feedback "
                 "WHERE decision_id = d.id)")
        args: tuple = ()
        if line is not None:
            query, args = query + " WHERE d.line = ?", (line,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY d.id DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------------------------------ feedback
    def add_feedback(self, decision_id: int, label: str, note: str = "") -> int:
        if label not in LABELS:
            raise ValueError(f"label {label!r}: use one of {list(LABELS)}")
        self.decision(decision_id)
        with self._lock:
            cur = self._db.execute("INSERT INTO feedback (decision_id, label, note, time) VALUES (?,?,?,?)",
                                   (decision_id, label, note[:1000], now()))
        return int(cur.lastrowid)

    def review(self, feedback_id: int, verdict: str) -> None:
        """Mark pending (or already reviewed, not exported) feedback accepted or rejected."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r}: use one of {list(VERDICTS)}")
        with self._lock:
            row = self._db.execute("SELECT exported_path FROM feedback WHERE id = ?", (feedback_id,)).fetchone()
            if row is None:
                raise ReviewError(f"feedback {feedback_id}: no such feedback")
            if row["exported_path"]:
                raise ReviewError(f"feedback {feedback_id}: already exported to {row['exported_path']}")
            self._db.execute("UPDATE feedback SET state = ?, reviewed_time = ? WHERE id = ?",
                             (verdict, now(), feedback_id))

    def feedback(self, state: str | None = None, line: str | None = None, limit: int = 200) -> list[dict]:
        query = ("SELECT f.*, d.line, d.model_version, d.score, d.decision, d.image_sha256, d.image_kept "
                 "FROM feedback f JOIN decisions d ON d.id = f.decision_id WHERE 1=1")
        args: list = []
        for column, value in (("f.state", state), ("d.line", line)):
            if value is not None:
                query += f" AND {column} = ?"
                args.append(value)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY f.id DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [dict(r) for r in rows]

    def _mark_exported(self, feedback_id: int, path: Path) -> None:
        with self._lock:
            self._db.execute("UPDATE feedback SET exported_path = ? WHERE id = ?", (str(path), feedback_id))


def export_false_alarms(store: DecisionStore, line: str, train_good: Path) -> dict[str, list]:
    """Copy the kept image of every accepted, not yet exported false alarm of `line` into `train_good`
    (the line's `train/good` folder) as `review-<sha256[:16]><ext>`, so the next retrain versions it with
    DVC. Each image's sha256 is re-checked first; a file is written to a temporary name and renamed, so an
    interrupted export leaves no partial image. Returns {"exported": [paths], "skipped": [reasons]}."""
    train_good = Path(train_good)
    if not train_good.is_dir():
        raise ReviewError(f"{train_good}: not a folder (the line's train/good folder is expected)")
    exported: list[str] = []
    skipped: list[str] = []
    for fb in _accepted_false_alarms(store, line):
        try:
            data, ext = store.read_image(fb["decision_id"])
        except ReviewError as exc:
            skipped.append(f"feedback {fb['id']}: {exc}")
            continue
        dest = train_good / f"review-{fb['image_sha256'][:16]}{ext}"
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, dest)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise ReviewError(f"{dest}: cannot write ({exc.strerror or exc})") from None
        store._mark_exported(fb["id"], dest)
        exported.append(str(dest))
    return {"exported": exported, "skipped": skipped}


def _accepted_false_alarms(store: DecisionStore, line: str) -> Iterable[dict]:
    return [fb for fb in store.feedback(state="accepted", line=line, limit=1_000_000)
            if fb["label"] == "false_alarm" and not fb["exported_path"]]
