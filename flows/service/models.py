"""Which model serves each line, and swapping it when its registry alias moves.

A `ModelTable` holds one `Served` model per (line, alias): `@champion` for every served line, loaded at
start, and `@challenger` loaded on its first request (or at start with `service.preload_challenger`).
`refresh()` asks the source which version each alias names now and, for every alias that moved, loads the
new version beside the old one (download and every sha256 verified) and then replaces the reference in one
assignment. A request that already holds the old `Served` finishes with it; later ones get the new one: no
request is dropped or fails during a swap. `start_polling(poll_s)` runs `refresh()` in a daemon thread.

One long-lived thread runs torch: the batcher's scoring thread (batching.py). Each load (and its warm-up)
runs in a thread of its own that ends with it (`in_own_thread`). The reason is libgomp, torch's OpenMP
runtime: every thread that runs a parallel torch kernel gets a team of worker threads that lives as long as
that thread, and once the process holds more OpenMP threads than cores, every team's workers stop
spin-waiting between kernels and sleep instead. On the 2-core reference machine that turned PatchCore's
7.8 ms batch-1 forward pass into 17-18 ms for good after one call from a second long-lived thread (a
loader in asyncio's pool, say); when the loader thread ends, its team goes and the speed comes back.

Sources:
- `RegistrySource`: the MLflow registry through flows.tracking (bank fetched from the object store, the
  manifest and every file sha256-checked by flows.pyfunc_model.fetch_detector, then the model's own
  manifest again by load_detector). A line with `serve_from` is scored by that unified model with its own
  threshold (`for_line`), and only if the unified version's `lines` tag names the line.
- `LocalSource`: saved model folders `{line: dir}` (load_detector checks every sha256 of the manifest), for
  a station without a registry and for bench/serving.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from components.config import Config
from components.data import Preprocess
from components.detector import Detector, load_detector, sha256_file
from components.thresholds import Threshold
from components.training import preprocess_for
from flows.names import serving_model

logger = logging.getLogger(__name__)

T = TypeVar("T")
CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)


class NotServedError(LookupError):
    """A line or alias this service cannot score with; the message says why."""


@dataclass(frozen=True)
class Served:
    """One loaded model version serving one line under one alias."""

    line: str
    alias: str
    name: str
    version: str
    detector: Detector = field(repr=False)
    loaded_at: float = field(default_factory=time.time)

    @property
    def threshold(self) -> Threshold | None:
        return getattr(self.detector, "threshold_", None)

    @cached_property
    def preprocess(self) -> Preprocess:
        """Built once per served version: every request reads it (header check, decode, batch)."""
        return preprocess_for(self.detector.cfg.data)

    @property
    def key(self) -> tuple[str, str, str]:
        """Images with the same key may share a forward pass."""
        return self.name, self.version, self.line

    def describe(self) -> dict:
        t = self.threshold
        return {"name": self.name, "version": self.version, "method": getattr(self.detector, "name", "?"),
                "threshold": None if t is None else t.image, "loaded_at": self.loaded_at}


def warm_up(served: Served, max_batch: int = 1) -> None:
    """Forward passes on blank images at every batch size the batcher uses (powers of two up to max_batch)
    before the model takes requests: the first pass at a shape builds caches and graphs, so without this
    the first requests after a load or swap would be several times slower."""
    pre = served.preprocess
    h, w = pre.output_hw or tuple(pre.image_size)
    try:
        for size in (1 << i for i in range(max(1, max_batch).bit_length())):
            served.detector.score(torch.zeros(size, 3, h, w))
    except Exception as exc:  # noqa: BLE001 - e.g. a tiled model that needs larger images: skip warming
        logger.info("%s@%s: no warm-up (%s)", served.line, served.alias, exc)


def in_own_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) in a new thread that ends when fn returns (its result, or its exception re-raised here):
    torch work off the scoring thread without leaving a second OpenMP team behind (module docstring)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            box["error"] = exc

    thread = threading.Thread(target=run, name="defectops-model-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


class ModelSource(Protocol):
    def current(self, line: str, alias: str) -> str | None:
        """The version `alias` names for `line` now (None: no such alias)."""

    def load(self, line: str, alias: str, version: str) -> Served:
        """Fetch, verify and load that version."""


class RegistrySource:
    """Versions from the MLflow registry, model folders from the object store (see the module docstring)."""

    def __init__(self, cfg: Config, cache: Path) -> None:
        self.cfg, self.cache = cfg, Path(cache)

    def current(self, line: str, alias: str) -> str | None:

        from flows import registry
        return registry.version_for_alias(serving_model(self.cfg, line)[0], alias)

    def load(self, line: str, alias: str, version: str) -> Served:

        name, unified = serving_model(self.cfg, line)
        dest = self.cache / f"{name}-{version}-{line}"
        from flows import registry
        detector, info = registry.load_version(name, version, dest)
        if unified:
            trained_on = json.loads(info["tags"].get("lines") or "[]")
            if line not in trained_on:
                raise NotServedError(f"{name} version {version} was not trained on line {line!r} (it serves "
                                     f"{trained_on or 'no lines'}): retrain it with that line or remove "
                                     f"lines.{line}.serve_from")
            detector = detector.for_line(line)
        return Served(line, alias, name, str(info["version"]), detector)

    def forget(self, served: Served) -> None:
        """Remove the model folder of a version no longer served."""
        shutil.rmtree(self.cache / f"{served.name}-{served.version}-{served.line}", ignore_errors=True)


class LocalSource:
    """Saved model folders `{line: dir}` as `@champion`; the version is the manifest's sha256 (12 hex)."""

    def __init__(self, folders: Mapping[str, Path]) -> None:
        self.folders = {line: Path(p) for line, p in folders.items()}

    def current(self, line: str, alias: str) -> str | None:
        folder = self.folders.get(line)
        if alias != CHAMPION or folder is None or not (folder / "manifest.json").is_file():
            return None
        return "local-" + sha256_file(folder / "manifest.json")[:12]

    def load(self, line: str, alias: str, version: str) -> Served:
        return Served(line, alias, str(self.folders[line]), version, load_detector(self.folders[line]))


class ModelTable:
    """The served models; thread-safe. `on_swap(old, new)` is called after each replacement."""

    def __init__(self, source: ModelSource, lines: list[str], *, preload_challenger: bool = False,
                 on_swap: Callable[[Served | None, Served], None] | None = None, warm_batch: int = 1) -> None:
        self.source, self.lines, self.warm_batch = source, list(lines), warm_batch
        self.preload_challenger, self.on_swap = preload_challenger, on_swap
        self._slots: dict[tuple[str, str], Served] = {}
        self._errors: dict[tuple[str, str], str] = {}
        self._wanted = {(line, CHAMPION) for line in self.lines}
        if preload_challenger:
            self._wanted |= {(line, CHALLENGER) for line in self.lines}
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, str], threading.Lock] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lookup
    def get(self, line: str, alias: str = CHAMPION) -> Served:
        """The model serving (line, alias); loads @challenger on first use. NotServedError with the reason."""
        if line not in self.lines:
            raise NotServedError(f"line {line!r} is not served here (served: {self.lines or 'none'})")
        if alias not in ALIASES:
            raise NotServedError(f"alias {alias!r}: use one of {list(ALIASES)}")
        served = self._slots.get((line, alias))
        if served is not None:
            return served
        with self._lock:
            self._wanted.add((line, alias))
        self._refresh_slot(line, alias)
        served = self._slots.get((line, alias))
        if served is None:
            raise NotServedError(f"line {line!r} has no @{alias} model: {self._errors.get((line, alias), '?')}")
        return served

    def loaded(self, line: str, alias: str = CHAMPION) -> Served | None:
        """The model serving (line, alias) if it is loaded (never blocks)."""
        return self._slots.get((line, alias))

    def status(self) -> dict[str, dict]:
        """{line: {alias: describe() | {"error": reason}}} for every wanted or loaded slot."""
        out: dict[str, dict] = {line: {} for line in self.lines}
        with self._lock:
            keys = sorted(self._wanted | set(self._slots))
        for line, alias in keys:
            served, error = self._slots.get((line, alias)), self._errors.get((line, alias))
            if served is None:
                out[line][alias] = {"error": error or "not loaded"}
            else:  # a failed load of a newer version keeps the old one serving; the reason is shown
                out[line][alias] = {**served.describe(), **({"last_error": error} if error else {})}
        return out

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every served line has its @champion loaded; else the reasons."""
        reasons = [f"{line}: {self._errors.get((line, CHAMPION), 'not loaded yet')}"
                   for line in self.lines if (line, CHAMPION) not in self._slots]
        if not self.lines:
            reasons.append("no lines to serve (params.yaml `lines` or service.lines is empty)")
        return not reasons, reasons

    # ------------------------------------------------------------------------------------------ refresh
    def refresh(self) -> list[str]:
        """Load every wanted alias whose version moved (or is not loaded); returns what changed."""
        with self._lock:
            keys = sorted(self._wanted)
        changes = []
        for line, alias in keys:
            change = self._refresh_slot(line, alias)
            if change:
                changes.append(change)
        return changes

    def _refresh_slot(self, line: str, alias: str) -> str | None:
        key = (line, alias)
        lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:
            old = self._slots.get(key)
            try:
                version = self.source.current(line, alias)
                if version is None:
                    self._errors[key] = f"no @{alias} version in the registry"
                    if alias == CHALLENGER and self._slots.pop(key, None) is not None:  # alias removed
                        return f"{line}@{alias}: {old.version} -> none"
                    return None
                if old is not None and old.version == version:
                    return None
                new = in_own_thread(self._load, line, alias, version)
            except Exception as exc:  # noqa: BLE001 - a failed load keeps serving the old version
                self._errors[key] = f"{type(exc).__name__}: {exc}"
                logger.error("%s@%s: could not load: %s", line, alias, self._errors[key])
                return None
            self._slots[key] = new  # the swap: one reference replaced; holders of `old` finish with it
            self._errors.pop(key, None)
        logger.info("%s@%s: now %s version %s (was %s)", line, alias, new.name, new.version,
                    old.version if old else "none")
        if self.on_swap is not None:
            self.on_swap(old, new)
        return f"{line}@{alias}: {old.version if old else 'none'} -> {new.version}"

    def _load(self, line: str, alias: str, version: str) -> Served:
        new = self.source.load(line, alias, version)
        warm_up(new, self.warm_batch)
        return new

    def start_polling(self, poll_s: float) -> None:
        """refresh() every `poll_s` seconds in a daemon thread, until stop()."""
        def loop() -> None:
            while not self._stop.wait(poll_s):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - keep polling; the error is logged
                    logger.exception("model refresh failed")

        self._thread = threading.Thread(target=loop, name="defectops-model-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
