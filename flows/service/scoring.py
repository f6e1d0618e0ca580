"""From uploaded bytes to recorded decisions: decode and check each image, micro-batch the forward pass,
decide against the line's threshold, record, and optionally render the views the operator page shows.

The normalised score follows anomalib's convention that the threshold maps to 0.5: for a positive image
threshold t, `clip(0.5 * score / t, 0, 1)` (the same scale the overlays use: report.normalise_map puts the
pixel threshold mid-scale); for t <= 0, `clip(0.5 + (score - t), 0, 1)`; None without a threshold.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image

from components.config import ServiceConfig
from components.data import DataError, ImageTooLargeError, Preprocess, decode_image, image_shape
from components.prediction import DEFECTIVE, GOOD, UNDECIDED
from components.report import jet, normalise_map, overlay
from components.training import to_uint8_image
from flows.service.batching import MicroBatcher
from flows.service.decisions import Decision, DecisionStore, extension_for
from flows.service.metrics import ServiceMetrics
from flows.service.models import ModelTable, Served

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"))


class BadRequest(Exception):
    """A request the service refuses: `status` (4xx), `reason` (metrics label), one-line message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes


@dataclass(frozen=True)
class Prepared:
    name: str
    sha256: str
    image_format: str
    hw: tuple[int, int]  # (H, W) from the header; the pixels are decoded on the scoring thread (batching.py)
    data: bytes

    def decode(self, max_pixels: int, preprocess: Preprocess) -> np.ndarray:
        """(H, W, 3) uint8; BadRequest (400, 413) naming the image if the body does not decode (or, when a
        late EXIF orientation turned it, no longer preprocesses)."""
        try:
            arr = decode_image(self.data, self.name, max_pixels)
            if arr.shape[:2] != self.hw:
                try:
                    preprocess.output_shape(*arr.shape[:2])
                except ValueError as exc:
                    raise DataError(self.name, str(exc)) from None
            return arr
        except ImageTooLargeError as exc:
            raise BadRequest(413, "too_many_pixels", str(exc)) from None
        except DataError as exc:
            raise BadRequest(400, "bad_image", str(exc)) from None


def sniff_format(data: bytes) -> str | None:
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def normalise(score: float, threshold: float | None) -> float | None:
    """Score -> [0, 1] with the threshold at 0.5 (see the module docstring)."""
    if threshold is None:
        return None
    value = 0.5 * score / threshold if threshold > 0 else 0.5 + (score - threshold)
    return float(min(max(value, 0.0), 1.0))


def prepare(upload: Upload, served: Served, max_pixels: int) -> Prepared:
    """Check one upload's header (format, declared size, that it preprocesses) and hash it; BadRequest
    (400, 413) naming it and the problem. Decoding comes later, on the scoring thread (batching.py)."""
    fmt = sniff_format(upload.data)
    try:
        if fmt is None and upload.data:
            raise DataError(upload.name, "not a PNG, JPEG, BMP or TIFF image (unknown leading bytes)")
        hw = image_shape(upload.data, upload.name, max_pixels)
        try:
            served.preprocess.output_shape(*hw)
        except ValueError as exc:
            raise DataError(upload.name, str(exc)) from None
    except ImageTooLargeError as exc:
        raise BadRequest(413, "too_many_pixels", str(exc)) from None
    except DataError as exc:
        raise BadRequest(400, "bad_image", str(exc)) from None
    return Prepared(upload.name, hashlib.sha256(upload.data).hexdigest(), fmt or "", hw, upload.data)


def png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def render_views(tensor: torch.Tensor, amap: np.ndarray, served: Served) -> dict[str, str]:
    """The three pictures of the page, base64 PNG: the image as scored, the heatmap, and the overlay with
    the flagged regions outlined (white, above the pixel threshold)."""
    image = to_uint8_image(tensor)
    pixel = served.threshold.pixel if served.threshold is not None else None
    return {"input_png": png_b64(image), "heatmap_png": png_b64(jet(normalise_map(amap, pixel))),
            "overlay_png": png_b64(overlay(image, amap, pixel))}


class Scorer:
    """Scores uploads for (line, alias) and records each decision."""

    def __init__(self, cfg: ServiceConfig, table: ModelTable, store: DecisionStore, metrics: ServiceMetrics) -> None:
        self.cfg, self.table, self.store, self.metrics = cfg, table, store, metrics
        self.batcher = MicroBatcher(cfg.max_batch, cfg.batch_window_ms / 1000.0, metrics.batch.observe)

    async def score(self, line: str, alias: str, uploads: list[Upload], t0: float,
                    views: bool = False) -> list[dict]:
        """One result row per upload, in order (see docs/serving.md); views adds the three base64 PNGs."""
        served, prepared, results, rows = await self._run(line, alias, uploads, t0)
        if views:
            for row, (_, amap, scored) in zip(rows, results, strict=True):
                row.update(await asyncio.to_thread(render_views, scored, amap, served))
        return rows

    async def overlay_png(self, line: str, alias: str, upload: Upload, t0: float) -> tuple[bytes, dict]:
        """(overlay PNG bytes, the result row) for one image."""
        served, prepared, results, rows = await self._run(line, alias, [upload], t0)
        pixel = served.threshold.pixel if served.threshold is not None else None
        _, amap, scored = results[0]
        image = overlay(to_uint8_image(scored), amap, pixel)
        return base64.b64decode(await asyncio.to_thread(png_b64, image)), rows[0]

    async def _run(self, line: str, alias: str, uploads: list[Upload], t0: float):
        served = self.table.loaded(line, alias) or await asyncio.to_thread(self.table.get, line, alias)
        prepared = await asyncio.gather(*(asyncio.to_thread(prepare, u, served, self.cfg.max_image_pixels)
                                          for u in uploads))
        limit = self.cfg.max_image_pixels
        results = await asyncio.gather(*(self.batcher.submit(served, partial(p.decode, limit, served.preprocess))
                                         for p in prepared))
        latency_ms = (time.perf_counter() - t0) * 1000.0
        decisions = [self._decision(served, p, score, latency_ms)
                     for p, (score, _, _) in zip(prepared, results, strict=True)]
        ids = await asyncio.to_thread(self._record, decisions, uploads, prepared)
        t = served.threshold
        rows = []
        for d, i in zip(decisions, ids, strict=True):
            rows.append({"decision_id": i, "image": d.image_name, "image_sha256": d.image_sha256, "line": line,
                         "alias": alias, "model": {"name": served.name, "version": served.version},
                         "score": d.score, "normalised_score": d.normalised_score, "threshold": d.threshold,
                         "pixel_threshold": None if t is None else t.pixel, "decision": d.decision,
                         "latency_ms": round(latency_ms, 3)})
            self.metrics.decisions.labels(line, alias, d.decision).inc()
            if d.normalised_score is not None:
                self.metrics.scores.labels(line, alias).observe(d.normalised_score)
        return served, prepared, results, rows

    @staticmethod
    def _decision(served: Served, p: Prepared, score: float, latency_ms: float) -> Decision:
        t = served.threshold
        if not math.isfinite(score):  # never decide on nan: a 500, logged, nothing recorded
            raise ValueError(f"{served.name} version {served.version} gave a non-finite score for {p.name}")
        verdict = UNDECIDED if t is None else (DEFECTIVE if score > t.image else GOOD)
        return Decision(served.line, served.alias, served.name, served.version, float(score),
                        normalise(score, None if t is None else t.image), None if t is None else t.image,
                        verdict, p.sha256, p.name, round(latency_ms, 3))

    def _record(self, decisions: list[Decision], uploads: list[Upload], prepared: list[Prepared]) -> list[int]:
        kept: list[str | None] = []
        for d, u, p in zip(decisions, uploads, prepared, strict=True):
            keep = self.cfg.keep_images == "all" or (self.cfg.keep_images == "defective" and d.decision == DEFECTIVE)
            if keep:
                ext = extension_for(p.image_format)
                self.store.keep_image(u.data, p.sha256, ext)
                kept.append(ext)
            else:
                kept.append(None)
        return self.store.record(decisions, kept)
