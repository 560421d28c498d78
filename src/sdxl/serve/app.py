"""The FastAPI app: security middleware (Basic auth, same-origin and Host checks, body size) and the routers.

Cross-site request forgery and DNS rebinding against local servers: a state-changing request (POST, PUT, PATCH,
DELETE) whose Origin is not this server's own, or any request whose Host is not one of this server's names, is
refused with 403 before it reaches a route.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import re
import secrets
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sdxl.errors import SDXLError
from sdxl.serve.config import LOOPBACK, ServeConfig
from sdxl.serve.jobs import LimitError

STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
# routers of the other serve modules, mounted when present: module -> attribute
OPTIONAL_ROUTERS = (("sdxl.serve.a1111", "router"), ("sdxl.serve.page", "router"))


def create_app(config: ServeConfig, jobs=None) -> FastAPI:
    """The server's app; its jobs and models are made (and the worker started) with the app's lifespan,
    or `jobs` (a started Jobs) is used as given."""
    from sdxl.serve import native

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.jobs is None:
            app.state.models, app.state.jobs = open_jobs(config)
            app.state.jobs.start()
        yield
        app.state.jobs.close()

    app = FastAPI(title="sdxl serve", version="1", lifespan=lifespan,
                  description="Stable Diffusion XL over HTTP: the native job API (/v1/jobs) and, when installed, "
                              "AUTOMATIC1111's API (/sdapi/v1) and a web page.")
    app.state.config = config
    app.state.jobs = jobs
    app.state.models = jobs.models if jobs is not None else None
    app.add_middleware(Guard, config=config)
    app.add_exception_handler(SDXLError, _sdxl_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(native.router)
    for module, attr in OPTIONAL_ROUTERS:
        try:
            router = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        app.include_router(router)
    return app


def open_jobs(config: ServeConfig):
    """(models folder, jobs) of a config, with a pool of pipelines per worker (its device); no worker started."""
    import torch

    from sdxl.serve.jobs import Jobs
    from sdxl.serve.models import ModelsFolder

    devices = worker_devices(config.device, config.workers)
    pools = [ModelsFolder(config.models_dir, d, config.dtype, config.memory_budget, config.memory_plan)
             for d in devices]
    if len(set(devices)) < len(devices):  # workers sharing a device share its memory and its cores
        from sdxl.memory import share

        for pool in pools:
            pool.budget //= len(devices)
            pool.plan = share(pool.plan, pool.device, len(devices))
        if pools[0].device == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // len(devices)))
    config.output_dir.mkdir(parents=True, exist_ok=True)
    return pools[0], Jobs(config.database, pools[0], config.output_dir, config.limits, pools)


def worker_devices(device: str | None, workers: int) -> list[str | None]:
    """The device of each worker: cuda:0..N-1 (round robin) when no device or a bare "cuda" is given and there are
    several GPUs; else the given (or best) device for all of them."""
    import torch

    if workers < 1:
        raise SDXLError(f"--workers {workers}: give 1 or more")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device in (None, "cuda") and gpus > 1:
        return [f"cuda:{i % gpus}" for i in range(workers)]
    return [device] * workers


async def _sdxl_error(request: Request, e: SDXLError) -> JSONResponse:
    return JSONResponse({"detail": str(e), "field": getattr(e, "field", None) or field_of(str(e))}, status_code=422)


def field_of(message: str) -> str | None:
    """The first request field an error message names ("steps must be in 1..1000" -> "steps"), if any."""
    from sdxl.serve.native import job_schema

    if m := re.search(r"unknown setting '(\w+)'", message):
        return m.group(1)
    names = set(job_schema()["properties"])
    return next((w.replace("-", "_") for w in re.findall(r"[a-z][a-z0-9_-]*", message)
                 if w.replace("-", "_") in names), None)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI's list of errors as one line naming the field."""
    first = e.errors()[0] if e.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return JSONResponse({"detail": f"{field or 'body'}: {first.get('msg', 'invalid')}", "field": field},
                        status_code=422)


class Guard:
    """ASGI middleware: auth (401), Host and Origin (403), body size (422), in that order."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config
        self.auth = config.api_auth.encode() if config.api_auth else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = dict(pairs)
        names = [k for k, _ in pairs]
        if repeated := next((k for k in ("host", "origin", "authorization") if names.count(k) > 1), None):
            return await _forbidden(f"the {repeated.title()} header is given more than once")(scope, receive, send)
        refusal = self.refusal(scope["method"], headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        limit = self.config.limits.max_body_bytes
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > limit:
            return await _body_too_big(limit)(scope, receive, send)
        await self.app(scope, _counting(receive, limit), send)

    def refusal(self, method: str, headers: dict) -> JSONResponse | None:
        if self.auth is not None and not self.authorized(headers.get("authorization", "")):
            return JSONResponse({"detail": "authentication required (HTTP Basic, as set by --api-auth)",
                                 "field": None}, status_code=401, headers={"WWW-Authenticate": 'Basic realm="sdxl"'})
        host = headers.get("host", "")
        if not self.own_host(host):
            return _forbidden(f"Host {host!r} is not this server's address (DNS rebinding?)")
        origin = headers.get("origin")
        if method in STATE_CHANGING and (headers.get("sec-fetch-site") == "cross-site"
                                         or (origin is not None and not self.same_origin(origin, host))):
            return _forbidden(f"cross-origin {method} from {origin or 'another site'} refused")
        return None

    def authorized(self, header: str) -> bool:
        """Basic credentials compared in constant time (both parts always compared)."""
        scheme, _, value = header.partition(" ")
        try:
            given = base64.b64decode(value.strip(), validate=True) if scheme.lower() == "basic" else b""
        except (binascii.Error, ValueError):
            given = b""
        return secrets.compare_digest(given, self.auth)

    def own_host(self, host: str) -> bool:
        """The Host header names this server: a name given with --allow-host (any port, e.g. behind a reverse
        proxy), or on this server's port a loopback name (bound to loopback), the bound address, or any name when
        bound to every interface (0.0.0.0, ::)."""
        parts = urlsplit(f"//{host}")
        try:
            port = parts.port or 80
        except ValueError:
            return False
        name = (parts.hostname or "").lower()
        if name and name in {h.lower() for h in self.config.allowed_hosts}:
            return True
        if port != self.config.port or not name:
            return False
        if self.config.host in ("0.0.0.0", "::", ""):
            return True
        return name in LOOPBACK if self.config.host in LOOPBACK else name == self.config.host.lower().strip("[]")

    @staticmethod
    def same_origin(origin: str, host: str) -> bool:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def _forbidden(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": None}, status_code=403)


def _body_too_big(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body is over the limit of {limit} bytes (max_body_bytes)",
                         "field": None}, status_code=422)


def _counting(receive, limit: int):
    """`receive` that stops a body (chunked, or longer than it said) at `limit` bytes."""
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise LimitError("body", f"request body is over the limit of {limit} bytes (max_body_bytes)")
        return message

    return counted
