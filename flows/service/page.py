"""The operator page: one static HTML page with its script and style (flows/service/static/), served by the
inference service at `/`. It calls the same JSON API as any client: /v1/lines, /v1/lines/{line}/score
(views=true for the image, heatmap and outlined overlay), /v1/decisions, and, with the token the operator
types in (kept in the browser's sessionStorage only), /v1/decisions/{id}/feedback, /v1/feedback/{id}/review
and /v1/lines/{line}/export-false-alarms."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")


def mount(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")
