"""The web page (issue 12): `GET /` and its static files, and `GET /page/config`, the facts the form is built from.

The page is plain HTML, CSS and JavaScript in `static/` (package data, no build step). It talks to the server's
native API (`/v1/jobs`, `/v1/models`), same origin only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from sdxl.models.model import BUCKETS
from sdxl.sampling.names import A1111_SAMPLERS, A1111_SCHEDULES, DEFAULT_SCHEDULE

STATIC = Path(__file__).parent / "static"
# The files the page is made of and their types; nothing else is served from the folder.
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# Same-origin scripts, styles and images only (previews arrive as data: URLs, uploads as blob: URLs); no framing.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                      "frame-ancestors 'none'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)


@router.get("/")
def index() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    if name not in FILES:
        raise HTTPException(404, f"no static file {name!r}")
    return _file(name)


@router.get("/page/config")
def config(request: Request, model: str | None = None) -> dict:
    """What the form is built from: size presets (the SDXL report's aspect buckets, appendix I), sampler and
    schedule names (ours -> A1111's), and the native settings of `model` (default: the server's current one)."""
    folder = request.app.state.models
    models = folder.models(model or None, None, None, ())
    return {"buckets": [list(b) for b in BUCKETS], "samplers": A1111_SAMPLERS, "schedules": A1111_SCHEDULES,
            "default_schedule": DEFAULT_SCHEDULE, "native": models.native | {"sampler": "euler"},
            "builtin_refiner": models.default_refiner, "model": model or folder.current}
