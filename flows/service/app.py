"""The inference service's HTTP API (FastAPI), the operator page included; docs/serving.md lists every
endpoint. `build(cfg, root)` wires a registry-backed service, `create_app(runtime)` the app:

    runtime = build(load_config("params.yaml"), Path(".defectops"))
    uvicorn.run(create_app(runtime), host="127.0.0.1", port=8000)

Errors are one JSON line, `{"error": "..."}`, with a 4xx status for anything the client can fix and
never a stack trace (a 500 says only that the server failed and logs the traceback).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from components.config import Config
from flows.service import page
from flows.service.decisions import DecisionStore, ReviewError, export_false_alarms
from flows.service.metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from flows.service.models import (
    CHAMPION,
    LocalSource,
    ModelSource,
    ModelTable,
    NotServedError,
    RegistrySource,
)
from flows.service.scoring import BadRequest, Scorer, Upload

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything one app serves with."""

    cfg: Config
    table: ModelTable
    store: DecisionStore
    metrics: ServiceMetrics
    scorer: Scorer
    token: str
    source: ModelSource


def served_lines(cfg: Config) -> list[str]:
    """service.lines, else every line of params.yaml; ValueError naming an unknown line."""
    lines = list(cfg.service.lines) if cfg.service.lines is not None else sorted(cfg.lines)
    unknown = [line for line in lines if line not in cfg.lines]
    if unknown and cfg.service.lines is not None:
        raise ValueError(f"service.lines names {unknown}, which are not in `lines` ({sorted(cfg.lines)})")
    return lines


def build(cfg: Config, root: Path, token: str, source: ModelSource | None = None,
          lines: list[str] | None = None) -> Runtime:
    """A runtime serving `lines` (default served_lines) from `source` (default the registry), decisions
    under ROOT/serving/."""
    serving = Path(root) / "serving"
    source = source or RegistrySource(cfg, serving / "models")
    metrics = ServiceMetrics()

    def swapped(old, new) -> None:
        metrics.swapped(old, new)
        if old is not None and hasattr(source, "forget"):
            source.forget(old)

    table = ModelTable(source, lines if lines is not None else served_lines(cfg),
                       preload_challenger=cfg.service.preload_challenger, on_swap=swapped,
                       warm_batch=cfg.service.max_batch)
    store = DecisionStore(serving)
    return Runtime(cfg, table, store, metrics, Scorer(cfg.service, table, store, metrics), token, source)


def local_runtime(cfg: Config, root: Path, token: str, folders: dict[str, Path]) -> Runtime:
    """A runtime serving saved model folders {line: dir} (no registry): `defectops api --model`, bench."""
    return build(cfg, root, token, LocalSource(folders), sorted(folders))


# ---------------------------------------------------------------------------------------------- bodies
async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, "too_large", f"request body exceeds service.max_request_bytes ({limit} bytes)")
        yield chunk


async def read_uploads(request: Request, runtime: Runtime) -> list[Upload]:
    """The images of a request: multipart/form-data (any number of file fields) or one raw image/* body."""
    limits = runtime.cfg.service
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise BadRequest(413, "too_large", f"request body of {declared} bytes exceeds service.max_request_bytes "
                                           f"({limits.max_request_bytes} bytes)")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        uploads = await _multipart(request, runtime)
    elif ctype.startswith("image/"):
        data = b"".join([chunk async for chunk in _capped(request, limits.max_request_bytes)])
        uploads = [Upload(request.query_params.get("name") or "body", data)]
    else:
        raise BadRequest(415, "unsupported_type", f"content-type {ctype or 'missing'!r}: send multipart/form-data "
                                                  "with one or more image files, or one raw image/* body")
    if not uploads:
        raise BadRequest(400, "no_image", "the request holds no image file")
    if len(uploads) > limits.max_images_per_request:
        raise BadRequest(413, "too_many_images", f"{len(uploads)} images in one request; the limit is "
                                                 f"service.max_images_per_request = {limits.max_images_per_request}")
    return uploads


async def _multipart(request: Request, runtime: Runtime) -> list[Upload]:
    limits = runtime.cfg.service
    parser = MultiPartParser(request.headers, _capped(request, limits.max_request_bytes),
                             max_files=limits.max_images_per_request, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        status = 413 if "Too many" in str(exc) else 400
        raise BadRequest(status, "bad_multipart", f"multipart body: {exc}") from None
    uploads = []
    try:
        for i, (_, value) in enumerate(form.multi_items()):
            if isinstance(value, UploadFile):
                uploads.append(Upload(value.filename or f"image-{i}", await value.read()))
    finally:
        await form.close()
    return uploads


def _check_token(request: Request, runtime: Runtime) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise BadRequest(401, "no_token", "this endpoint changes state: send 'Authorization: Bearer <token>' "
                                          "(DEFECTOPS_SERVICE_TOKEN or services.root/service-token.json)")
    if not secrets.compare_digest(given.strip().encode(), runtime.token.encode()):
        raise BadRequest(403, "bad_token", "the bearer token is not this service's token")


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest(400, "bad_json", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "bad_json", "the body must be a JSON object")
    return body


# ---------------------------------------------------------------------------------------------- app
def create_app(runtime: Runtime, poll: bool = True) -> FastAPI:
    """The app; its lifespan loads the champions in the background and polls every service.poll_s."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(asyncio.to_thread(runtime.table.refresh))
        if poll:
            runtime.table.start_polling(runtime.cfg.service.poll_s)
        try:
            yield
        finally:
            runtime.table.stop()
            loading.cancel()
            await runtime.scorer.batcher.close()
            runtime.store.close()

    app = FastAPI(title="defectops inference service", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.runtime = runtime
    _errors(app, runtime)
    _timing(app, runtime)
    _health_routes(app, runtime)
    _score_routes(app, runtime)
    _review_routes(app, runtime)
    page.mount(app)
    return app


def _errors(app: FastAPI, runtime: Runtime) -> None:
    def reply(status: int, reason: str, message: str) -> JSONResponse:
        runtime.metrics.rejected.labels(reason).inc()
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest):
        return reply(exc.status, exc.reason, exc.message)

    @app.exception_handler(NotServedError)
    async def not_served(_: Request, exc: NotServedError):
        return reply(404, "not_served", str(exc))

    @app.exception_handler(ReviewError)
    async def review_error(_: Request, exc: ReviewError):
        return reply(404 if "no such" in str(exc) else 409, "review", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return reply(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return reply(exc.status_code, "http", str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return reply(500, "internal", f"internal error ({type(exc).__name__}); see the service log")


class _Timing:
    """Pure ASGI middleware: stamps scope["state"]["t0"] (request.state.t0) and observes each request's
    latency by route and status. (Starlette's BaseHTTPMiddleware, the @app.middleware form, runs the app in
    a task behind a memory stream: measurably slower per request.)"""

    def __init__(self, app, runtime: Runtime) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope.setdefault("state", {})["t0"] = t0
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.runtime.metrics.latency.labels(endpoint, str(status)).observe(time.perf_counter() - t0)


def _timing(app: FastAPI, runtime: Runtime) -> None:
    app.add_middleware(_Timing, runtime=runtime)


def _health_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ok, reasons = runtime.table.ready()
        return JSONResponse({"ready": ok, "reasons": reasons, "lines": runtime.table.status()},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/lines")
    async def lines():
        return {"lines": runtime.table.status()}

    @app.post("/v1/reload")
    async def reload(request: Request):
        _check_token(request, runtime)
        return {"changes": await asyncio.to_thread(runtime.table.refresh), "lines": runtime.table.status()}


def _score_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.post("/v1/lines/{line}/score")
    async def score(line: str, request: Request, alias: str = CHAMPION, views: bool = False):
        uploads = await read_uploads(request, runtime)
        t0 = request.state.t0
        if "image/png" in request.headers.get("accept", "") and "application/json" not in request.headers.get("accept", ""):
            if len(uploads) != 1:
                raise BadRequest(406, "not_acceptable", f"an image/png answer holds one overlay; this request "
                                                        f"has {len(uploads)} images (ask for JSON with views=true)")
            png, row = await runtime.scorer.overlay_png(line, alias, uploads[0], t0)
            headers = {f"X-Defectops-{k}": str(row[key]) for k, key in (
                ("Score", "score"), ("Normalised-Score", "normalised_score"), ("Decision", "decision"),
                ("Threshold", "threshold"), ("Decision-Id", "decision_id"), ("Latency-Ms", "latency_ms"))}
            headers["X-Defectops-Model"] = f"{row['model']['name']}/{row['model']['version']}"
            return Response(png, media_type="image/png", headers=headers)
        return {"results": await runtime.scorer.score(line, alias, uploads, t0, views)}


def _review_routes(app: FastAPI, runtime: Runtime) -> None:
    store = runtime.store

    @app.get("/v1/decisions")
    async def decisions(line: str | None = None, limit: int = 50):
        return {"decisions": await asyncio.to_thread(store.recent, line, max(1, min(limit, 1000)))}

    @app.get("/v1/decisions/{decision_id}/image")
    async def decision_image(decision_id: int):
        data, ext = await asyncio.to_thread(store.read_image, decision_id)
        media = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff"}
        return Response(data, media_type=media.get(ext, "application/octet-stream"))

    @app.post("/v1/decisions/{decision_id}/feedback")
    async def feedback(decision_id: int, request: Request):
        _check_token(request, runtime)
        body = await _json_body(request)
        try:
            fid = await asyncio.to_thread(store.add_feedback, decision_id, str(body.get("label", "")),
                                          str(body.get("note", "")))
        except ValueError as exc:
            raise BadRequest(400, "bad_label", str(exc)) from None
        return {"feedback_id": fid, "state": "pending"}

    @app.get("/v1/feedback")
    async def feedback_list(state: str | None = None, line: str | None = None):
        return {"feedback": await asyncio.to_thread(store.feedback, state, line)}

    @app.post("/v1/feedback/{feedback_id}/review")
    async def review(feedback_id: int, request: Request):
        _check_token(request, runtime)
        verdict = str((await _json_body(request)).get("verdict", ""))
        try:
            await asyncio.to_thread(store.review, feedback_id, verdict)
        except ValueError as exc:
            raise BadRequest(400, "bad_verdict", str(exc)) from None
        return {"feedback_id": feedback_id, "state": verdict}

    @app.post("/v1/lines/{line}/export-false-alarms")
    async def export(line: str, request: Request):
        _check_token(request, runtime)
        spec = runtime.cfg.lines.get(line)
        if spec is None:
            raise NotServedError(f"line {line!r} is not in params.yaml `lines`")
        return await asyncio.to_thread(export_false_alarms, store, line, spec.data / "train" / "good")
