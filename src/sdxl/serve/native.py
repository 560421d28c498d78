"""The native API, versioned and small: `/v1/jobs` (submit, state, live progress, cancel) and `/v1/models`.

A job is a JSON object of `Request` fields (the same names and rules as `sdxl generate`'s flags, documented in the
OpenAPI schema at /openapi.json) plus model, refiner, vae, loras, init_image, mask (base64 or data URLs; a URL is
never fetched) and n_iter. For example:

    curl -s localhost:7860/v1/jobs -d '{"prompt": "a red circle <lora:style:0.8>", "seed": 5, "steps": 20}'
        -> {"id": "9f2c...", "url": "/v1/jobs/9f2c..."}                          (201; a 422 names the field)
    curl -s localhost:7860/v1/jobs/9f2c...          -> state, step/total, preview, images (URLs), infotexts, seeds
    curl -N localhost:7860/v1/jobs/9f2c.../events   -> Server-Sent Events: `progress` per step, then `done`
    curl -X DELETE localhost:7860/v1/jobs/9f2c...   -> cancelled (queued: at once; running: at its next step)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import asdict, fields
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel

from sdxl.errors import SDXLError
from sdxl.request import NOT_SETTINGS
from sdxl.request import Request as GenerationRequest
from sdxl.serve.jobs import JobSpec, JobState
from sdxl.adapters.tags import lora_weight

router = APIRouter(prefix="/v1", tags=["native"])
# the job fields that are not Request settings, and their JSON schemas
JOB_FIELDS = {
    "model": ({"type": "string"}, "checkpoint name as listed by GET /v1/models (default: the current one)"),
    "refiner": ({"type": "string"}, "refiner checkpoint name; \"none\": no refiner, not even the default "
                                     "model's built-in one (absent: the model's default)"),
    "vae": ({"type": "string"}, "VAE name from the vae folder"),
    "loras": ({"type": "array", "items": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]}},
              "[[NAME, WEIGHT], ...] from the loras folder (or <lora:NAME:WEIGHT> in the prompt)"),
    "init_image": ({"type": "string"}, "img2img: a PNG or JPEG as base64 or a data URL (never a URL to fetch)"),
    "mask": ({"type": "string"}, "inpainting mask (white = repaint) as base64 or a data URL"),
    "n_iter": ({"type": "integer", "minimum": 1}, "runs of `batch` images; run j uses seed + j * batch"),
}


class JobOut(BaseModel):
    """A job's state; `images` are URLs of the PNGs (each carries its infotext and recipe)."""

    id: str
    state: str
    step: int
    total: int
    job_count: int
    preview: str | None  # base64 PNG of the current latent while running
    images: list[str]
    infotexts: list[str]
    seeds: list[int]
    prompts: list[str]
    width: int
    height: int
    error: str | None


class Submitted(BaseModel):
    id: str
    url: str


@cache
def job_schema() -> dict:
    """JSON schema of a job body: every Request setting (described by `sdxl generate`'s help) + JOB_FIELDS."""
    from sdxl.cli import generate_help

    helps = generate_help()
    props = {}
    for f in fields(GenerationRequest):
        if f.name not in NOT_SETTINGS:
            props[f.name] = _schema(f.type) | {"description": helps.get(f.name, f.name.replace("_", " "))}
            if f.name == "seed":
                props[f.name]["description"] += " (-1: random)"
    for name, (schema, text) in JOB_FIELDS.items():
        props[name] = schema | {"description": text}
    return {"type": "object", "properties": props, "required": ["prompt"], "additionalProperties": False}


def _schema(annotation: str) -> dict:
    """A Request field annotation ("int", "float | None", "tuple[int, int] | None") as JSON schema."""
    kinds = {"int": {"type": "integer"}, "float": {"type": "number"}, "str": {"type": "string"},
             "bool": {"type": "boolean"}}
    out = []
    for kind in annotation.split(" | "):
        if kind == "None":
            out.append({"type": "null"})
        elif kind.startswith("tuple["):
            parts = [p.strip() for p in kind[6:-1].split(",")]
            out.append({"type": "array", "items": kinds[parts[0]]} if parts[-1] == "..." else
                       {"type": "array", "prefixItems": [kinds[p] for p in parts], "minItems": len(parts),
                        "maxItems": len(parts)})
        else:
            out.append(kinds[kind])
    return out[0] if len(out) == 1 else {"anyOf": out}


def spec_from_body(body, source: str) -> JobSpec:
    """A job body -> JobSpec; settings are checked by the queue (Request's rules), the rest here."""
    if not isinstance(body, dict):
        raise SDXLError(f"{source}: expected a JSON object of settings")
    settings = {k: v for k, v in body.items() if k not in JOB_FIELDS}
    for name in ("model", "refiner", "vae"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise SDXLError(f"{source}: {name} must be a string (a name from GET /v1/models)")
    loras = body.get("loras") or []
    if not isinstance(loras, list) or not all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
                                              and isinstance(x[1], (int, float)) for x in loras):
        raise SDXLError(f"{source}: loras must be a list of [NAME, WEIGHT] pairs")
    n_iter = body.get("n_iter", 1)
    return JobSpec(settings, body.get("model"), body.get("refiner"), body.get("vae"),
                   tuple((n, lora_weight(w, f"{source}: loras[{i}] {n!r}")) for i, (n, w) in enumerate(loras)),
                   decode_image(body.get("init_image"), "init_image", source),
                   decode_image(body.get("mask"), "mask", source), n_iter, source)


def decode_image(value, name: str, source: str) -> bytes | None:
    """Base64 or a data URL -> bytes. URLs are refused, never fetched (server-side request forgery)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SDXLError(f"{source}: {name} must be a base64 string or a data URL")
    if "://" in value[:16]:
        raise SDXLError(f"{source}: {name} is a URL; URLs are never fetched, send the image as base64")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SDXLError(f"{source}: {name} is not valid base64") from None


def job_out(s: JobState) -> dict:
    d = asdict(s)
    d["preview"] = base64.b64encode(s.preview).decode() if s.preview else None
    d["images"] = [f"/v1/jobs/{s.id}/images/{i}" for i in range(len(s.images))]
    return d


def _get(request: Request, job_id: str) -> JobState:
    try:
        return request.app.state.jobs.get(job_id)
    except KeyError:
        raise HTTPException(404, f"no job {job_id!r}") from None


@router.post("/jobs", response_model=Submitted, status_code=201, summary="Submit a generation job",
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"application/json": {"schema": job_schema()}}}})
async def submit(request: Request):
    """Queue a job; returns its id at once. Invalid settings or a broken limit: 422 naming the field."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise SDXLError("POST /v1/jobs: the body is not valid JSON") from None
    spec = spec_from_body(body, "POST /v1/jobs")
    job_id = await asyncio.to_thread(request.app.state.jobs.submit, spec)
    return {"id": job_id, "url": f"/v1/jobs/{job_id}"}


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A job's state, progress and results")
def get_job(request: Request, job_id: str):
    return job_out(_get(request, job_id))


@router.delete("/jobs/{job_id}", response_model=JobOut, summary="Cancel a job (queued: at once; running: next step)")
def cancel_job(request: Request, job_id: str):
    _get(request, job_id)
    request.app.state.jobs.cancel(job_id)
    return job_out(_get(request, job_id))


@router.get("/jobs/{job_id}/images/{index}", response_class=FileResponse, summary="A result PNG")
def job_image(request: Request, job_id: str, index: int):
    images = _get(request, job_id).images
    if not 0 <= index < len(images) or not Path(images[index]).is_file():
        raise HTTPException(404, f"job {job_id} has no image {index}")
    return FileResponse(images[index], media_type="image/png")


@router.get("/jobs/{job_id}/events", summary="Live progress as Server-Sent Events",
            response_description="text/event-stream: `progress` events (the job's state) until a final `done`")
async def job_events(request: Request, job_id: str):
    _get(request, job_id)

    async def events():
        last = None
        while True:
            s = await asyncio.to_thread(request.app.state.jobs.get, job_id)
            final = s.state not in ("queued", "running")
            if (s.state, s.step) != last or final:
                last = (s.state, s.step)
                yield f"event: {'done' if final else 'progress'}\ndata: {json.dumps(job_out(s))}\n\n"
            if final or await request.is_disconnected():
                return
            await asyncio.sleep(0.1)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", summary="The models folder: checkpoints, loras, vae, embeddings (name, title, hash)")
def list_models(request: Request):
    models = request.app.state.models
    return {"current": models.current} | {kind: [m.as_dict() for m in models.list(kind)]
                                          for kind in ("checkpoints", "loras", "vae", "embeddings")}
