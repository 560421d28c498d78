"""AUTOMATIC1111's HTTP API (`/sdapi/v1/...`) and OpenAI's `POST /v1/images/generations`, over the server's jobs.

Field names, defaults and response shapes follow A1111's modules/api/models.py (a request's fields are the
arguments of StableDiffusionProcessingTxt2Img/Img2Img, every one optional) and modules/api/api.py, as the
`webuiapi` client sends and reads them. The pure functions (`job_spec`, `a1111_response`, `parse_infotext`,
`openai_settings`) hold the rules and are tested alone; the routes only call them and the job queue.

A field this server does not use is ignored (clients send dozens); a wrong type is a 422 naming the field; a value
that would ask for something the pipeline does not do (face restoration, variation seeds, "only masked"
inpainting, a GAN upscaler) is a 422 naming the field and what to send instead, never a silently different image.
Omitted fields take the model's native settings (size, steps, CFG), as `sdxl generate` does.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from PIL import Image, ImageFilter, ImageOps

from sdxl.errors import SDXLError
from sdxl.formats.png import file_hash
from sdxl.images import load_image, opened
from sdxl.sampling import names
from sdxl.serve.app import field_of
from sdxl.serve.jobs import INTERNAL, JobSpec
from sdxl.serve.models import NO_REFINER
from sdxl.serve.native import decode_image


class FieldError(SDXLError):
    """A request field with a wrong type or a value this server cannot honour; `field` names it for the 422."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# A1111 request fields that this server reads -> the JSON types accepted (None is always accepted: the default).
_INT, _FLOAT, _BOOL, _STR = "an integer", "a number", "a boolean", "a string"
FIELDS = {
    "prompt": _STR, "negative_prompt": _STR, "styles": "a list", "seed": _INT, "subseed": _INT,
    "subseed_strength": _FLOAT, "seed_resize_from_w": _INT, "seed_resize_from_h": _INT,
    "sampler_name": _STR, "sampler_index": _STR, "scheduler": _STR, "steps": _INT, "cfg_scale": _FLOAT,
    "width": _INT, "height": _INT, "batch_size": _INT, "n_iter": _INT, "denoising_strength": _FLOAT,
    "enable_hr": _BOOL, "hr_scale": _FLOAT, "hr_second_pass_steps": _INT, "hr_resize_x": _INT, "hr_resize_y": _INT,
    "hr_upscaler": _STR, "hr_checkpoint_name": _STR, "hr_sampler_name": _STR, "hr_scheduler": _STR,
    "hr_prompt": _STR, "hr_negative_prompt": _STR, "firstphase_width": _INT, "firstphase_height": _INT,
    "refiner_checkpoint": _STR, "refiner_switch_at": _FLOAT, "override_settings": "an object",
    "send_images": _BOOL, "save_images": _BOOL, "restore_faces": _BOOL, "tiling": _BOOL,
    "script_name": _STR, "alwayson_scripts": "an object",
    "init_images": "a list", "mask": _STR, "mask_blur": _INT, "inpainting_fill": _INT, "inpaint_full_res": _BOOL,
    "inpainting_mask_invert": _BOOL, "resize_mode": _INT, "include_init_images": _BOOL,
}
# A1111 field -> the Request field it sets directly.
SAME_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
               "cfg_scale": "cfg", "width": "width", "height": "height", "batch_size": "batch"}
# Request field -> the A1111 field a client sent it as (for the 422s of Request's rules and the server's limits).
A1111_FIELDS = {ours: theirs for theirs, ours in SAME_FIELDS.items()} | {
    "sampler": "sampler_name", "schedule": "scheduler", "strength": "denoising_strength",
    "hires_strength": "denoising_strength", "hires_scale": "hr_scale", "hires_steps": "hr_second_pass_steps",
    "refiner_switch": "refiner_switch_at", "model": "override_settings.sd_model_checkpoint",
    "vae": "override_settings.sd_vae", "refiner": "refiner_checkpoint", "init_image": "init_images",
    "loras": "prompt"}  # <lora:NAME:W> tags
# A1111's latent upscale modes (modules/shared_items.py latent_upscale_modes): all run as our latent upscale
# (bicubic); its pixel upscalers that are plain resizes run as our pixel upscale.
LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                    "Latent (nearest)", "Latent (nearest-exact)")
PIXEL_UPSCALERS = ("None", "Lanczos")
MASK_BLUR = 4  # A1111's img2img default (StableDiffusionProcessingImg2Img.mask_blur)
# A1111's inpainting_fill values (modules/ui.py "Masked content"): 0 fill, 1 original, 2 latent noise, 3 nothing.
FILL, ORIGINAL = 0, 1
# resize_mode: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale).
JUST_RESIZE, CROP_AND_RESIZE = 0, 1


def _typed(name: str, value, kind: str):
    """`value` if it is of `kind` (JSON numbers with no fraction count as integers, 0/1 as booleans)."""
    ok = {_INT: lambda v: type(v) is int or (type(v) is float and v.is_integer()),
          _FLOAT: lambda v: type(v) in (int, float),
          _BOOL: lambda v: type(v) is bool or (type(v) is int and v in (0, 1)),
          _STR: lambda v: type(v) is str,
          "a list": lambda v: type(v) is list,
          "an object": lambda v: type(v) is dict}[kind]
    if not ok(value):
        raise FieldError(name, f"must be {kind}, got {json.dumps(value)[:60]}")
    if kind == _INT:
        return int(value)
    if kind == _FLOAT:
        return float(value)
    return bool(value) if kind == _BOOL else value


def checked_fields(payload) -> dict:
    """The fields this server reads, type-checked; unknown fields and nulls dropped (nulls mean the default)."""
    if not isinstance(payload, dict):
        raise FieldError("body", f"expected a JSON object, got {type(payload).__name__}")
    for k, v in payload.items():  # NaN/Infinity (Python's JSON reads them) in any field, echoed in `parameters` too
        if (bad := _non_finite(v)) is not None:
            raise FieldError(k, f"must be a finite number, got {bad}")
    return {k: _typed(k, v, FIELDS[k]) for k, v in payload.items() if k in FIELDS and v is not None}


def _non_finite(value):
    """The first NaN or infinite number inside a JSON value, else None (a loop: any depth)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return v
        todo.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
    return None


def sampler_and_schedule(p: dict) -> dict:
    """sampler_name (or sampler_index) and scheduler -> our sampler and schedule ("DPM++ 2M Karras" and
    "DPM++ 2M" + "Karras" both name dpmpp_2m on the karras schedule)."""
    name = p.get("sampler_name") or p.get("sampler_index")
    if name is None and p.get("scheduler") is None:
        return {}
    try:
        sampler, schedule = names.from_a1111(name or names.A1111_SAMPLERS["euler"], p.get("scheduler"))
    except SDXLError as e:
        raise FieldError("scheduler" if "schedule type" in str(e) else "sampler_name", str(e)) from None
    return {"sampler": sampler, "schedule": schedule}


def request_settings(p: dict, kind: str) -> dict:
    """The `Request` settings of an A1111 payload (checked fields); only what the payload gives."""
    s = {ours: p[theirs] for theirs, ours in SAME_FIELDS.items() if theirs in p}
    s.setdefault("prompt", "")
    s |= sampler_and_schedule(p)
    if kind == "img2img":
        s["strength"] = p.get("denoising_strength", 0.75)  # A1111's img2img default
    if refiner_choice(p) != NO_REFINER and p.get("refiner_switch_at") is not None:  # the model's own refiner too
        s["refiner_switch"] = p["refiner_switch_at"]  # else 0.8 with a refiner (session.with_defaults)
    return s | hires_settings(p)


def refiner_choice(p: dict) -> str | None:
    """refiner_checkpoint -> JobSpec.refiner. A1111 runs no refiner for "None", "none" or "" (process_images in
    modules/processing.py); here "None"/"none" also turn off the default model's built-in refiner, while absent,
    null or "" leave the model's default (as `sdxl generate` without --refiner does)."""
    name = p.get("refiner_checkpoint")
    if name in (None, ""):
        return None
    return NO_REFINER if name.lower() == NO_REFINER else name


def hires_settings(p: dict) -> dict:
    """enable_hr and its fields -> hires_scale, hires_upscale, hires_steps, hires_strength."""
    if not p.get("enable_hr"):
        return {}
    upscaler = p.get("hr_upscaler", "Latent")
    if upscaler not in LATENT_UPSCALERS + PIXEL_UPSCALERS:
        raise FieldError("hr_upscaler", f"{upscaler!r} is not available here; use one of "
                         f"{', '.join(LATENT_UPSCALERS + PIXEL_UPSCALERS)}")
    for field in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        if p.get(field) not in (None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler",
                                p.get(field[3:])):
            raise FieldError(field, "a second pass with its own checkpoint, sampler or prompt is not supported; "
                             "leave it empty (the first pass's is used)")
    s = {"hires_scale": _hires_scale(p), "hires_upscale": "latent" if upscaler in LATENT_UPSCALERS else "pixel"}
    if p.get("hr_second_pass_steps"):
        s["hires_steps"] = p["hr_second_pass_steps"]
    s["hires_strength"] = p.get("denoising_strength", 0.75)  # A1111's txt2img default
    return s


def _hires_scale(p: dict) -> float:
    """hr_scale, or the scale that hr_resize_x/hr_resize_y ask for (one scale for both sides)."""
    rx, ry = p.get("hr_resize_x", 0), p.get("hr_resize_y", 0)
    if not (rx or ry):
        return p.get("hr_scale", 2.0)
    if "width" not in p or "height" not in p:
        raise FieldError("hr_resize_x", "hr_resize_x/hr_resize_y need width and height in the same request")
    w, h = p["width"], p["height"]
    scale = rx / w if rx else ry / h
    got = [int(round(v * scale / 8)) * 8 for v in (w, h)]
    if (rx and got[0] != rx) or (ry and got[1] != ry):
        raise FieldError("hr_resize_x", f"{rx}x{ry} does not keep the aspect ratio of {w}x{h} (the hires fix "
                         f"scales both sides alike); give hr_scale, or one of hr_resize_x/hr_resize_y")
    return scale


def refused(p: dict) -> None:
    """A 422 for values that ask for what this pipeline does not do."""
    rules = [("restore_faces", p.get("restore_faces"), "face restoration is not available; send false"),
             ("tiling", p.get("tiling"), "tiling is not available; send false"),
             ("subseed_strength", p.get("subseed_strength", 0.0) != 0.0,
              "variation seeds are not available; send 0 (subseed is then ignored)"),
             ("script_name", p.get("script_name") not in (None, ""), "scripts are not available; send null"),
             ("alwayson_scripts", bool(p.get("alwayson_scripts")), "extensions' scripts are not available; send {}"),
             ("seed_resize_from_w", p.get("seed_resize_from_w", -1) > 0 or p.get("seed_resize_from_h", -1) > 0,
              "resizing the seed is not available; send -1 or 0"),
             ("firstphase_width", p.get("firstphase_width", 0) > 0 or p.get("firstphase_height", 0) > 0,
              "the old first-pass size is not available; send 0 and give width, height and hr_scale"),
             ("n_iter", p.get("n_iter", 1) < 1, f"must be at least 1, got {p.get('n_iter')}")]
    for field, bad, why in rules:
        if bad:
            raise FieldError(field, why)


def model_choice(p: dict) -> dict:
    """override_settings (sd_model_checkpoint, sd_vae) and refiner_checkpoint -> JobSpec's model, vae, refiner."""
    o = p.get("override_settings", {})
    out = {}
    for key, ours in (("sd_model_checkpoint", "model"), ("sd_vae", "vae")):
        value = o.get(key)
        if value is not None and type(value) is not str:
            raise FieldError(f"override_settings.{key}", f"must be a string, got {json.dumps(value)[:60]}")
        if value not in (None, "", "Automatic", "None"):
            out[ours] = value
    if refiner_choice(p) is not None:
        out["refiner"] = refiner_choice(p)
    return out


@contextmanager
def naming(field: str | None = None, fields: dict | None = None):
    """SDXLErrors raised inside name `field`, or the field of the client's API that `fields` maps theirs to."""
    try:
        yield
    except SDXLError as e:
        ours = getattr(e, "field", None) or field_of(str(e))
        e.field = field or (fields or {}).get(ours, ours)
        raise


def image_bytes(value, field: str) -> bytes | None:
    """A base64 image or data: URL (the native API's rule: URLs are never fetched), errors naming the field."""
    with naming(field):
        return decode_image(value, field, field)


def job_spec(payload, kind: str, decode) -> JobSpec:
    """A txt2img/img2img body -> the job it asks for. `decode(bytes, field)` -> PIL image (for mask options)."""
    p = checked_fields(payload)
    refused(p)
    init, mask = inpaint_inputs(p, decode) if kind == "img2img" else (None, None)
    settings = request_settings(p, kind)
    if mask is not None:
        settings["mask_blur"] = p.get("mask_blur", MASK_BLUR)
    return JobSpec(settings, init_image=init, mask=mask, n_iter=p.get("n_iter", 1), source=kind, **model_choice(p))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content (modules/masking.py fill): the masked area painted with ever less blurred
    averages of the colours around it, the known pixels kept exactly."""
    known = image.convert("RGB").convert("RGBA")
    known.putalpha(ImageOps.invert(mask.convert("L").point(lambda v: 255 if v >= 128 else 0)))
    premultiplied = known.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def inpaint_inputs(p: dict, decode) -> tuple[bytes, bytes | None]:
    """init_images[0] and mask -> (init PNG/JPEG bytes, mask bytes), with A1111's mask options applied:
    inpainting_mask_invert, inpainting_fill 0 (fill) or 1 (original),
    resize_mode 0 (just resize, as the pipeline does) or 1 (crop and resize). `decode(bytes, field)` -> PIL image."""
    images = p.get("init_images") or []
    if len(images) != 1 or type(images[0]) is not str:
        raise FieldError("init_images", f"send exactly one image as a base64 string, got {len(images)} items")
    init = image_bytes(images[0], "init_images")
    mask = image_bytes(p["mask"], "mask") if "mask" in p else None
    resize = p.get("resize_mode", JUST_RESIZE)
    if resize not in (JUST_RESIZE, CROP_AND_RESIZE):
        raise FieldError("resize_mode", f"{resize} is not available; use 0 (just resize) or 1 (crop and resize)")
    if mask is None and resize == JUST_RESIZE:
        return init, None
    image = decode(init, "init_images")
    if resize == CROP_AND_RESIZE:
        if "width" not in p or "height" not in p:
            raise FieldError("resize_mode", "crop and resize needs width and height")
        image = ImageOps.fit(image.convert("RGB"), (p["width"], p["height"]), Image.LANCZOS)
    m = _mask(p, decode(mask, "mask"), image.size, resize) if mask is not None else None
    if m is not None and p.get("inpainting_fill", FILL) == FILL:
        image = fill_masked(image, m)
    changed = resize == CROP_AND_RESIZE or (m is not None and p.get("inpainting_fill", FILL) == FILL)
    return png_bytes(image) if changed else init, png_bytes(m) if m is not None else None


def _mask(p: dict, m: Image.Image, size: tuple[int, int], resize: int) -> Image.Image:
    """The mask as A1111 prepares it (modules/processing.py init): inverted, fitted like its image (its blur is
    the pipeline's, `Request.mask_blur`)."""
    if p.get("inpaint_full_res", False):
        raise FieldError("inpaint_full_res", "inpainting only the masked area at full resolution is not available; "
                         "send false (the whole picture is inpainted)")
    fill = p.get("inpainting_fill", FILL)
    if fill not in (FILL, ORIGINAL):
        raise FieldError("inpainting_fill", f"{fill} (latent noise/nothing) is not available; use 0 (fill) or "
                         "1 (original)")
    if m.mode == "RGBA" and m.getextrema()[-1] != (255, 255):  # a painted layer: its opacity is the mask
        m = m.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    m = m.convert("L")
    if p.get("inpainting_mask_invert"):
        m = ImageOps.invert(m)
    if resize == CROP_AND_RESIZE:
        m = ImageOps.fit(m, size, Image.LANCZOS)
    if m.size != size:
        raise FieldError("mask", f"the mask is {m.size[0]}x{m.size[1]} but the image is {size[0]}x{size[1]}")
    return m  # mask_blur goes to Request.mask_blur: the pipeline blurs, one rule with the CLI


# --- infotext ---------------------------------------------------------------------------------------------------

_PAIR = re.compile(r'\s*([\w][\w \-/()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """A1111's infotext -> its fields (modules/infotext_utils.py parse_generation_parameters): "Prompt",
    "Negative prompt", then each "Key: value" of the last line; "Size" also as "Size-1", "Size-2"."""
    *lines, last = text.strip().split("\n") if text.strip() else [""]
    pairs = _PAIR.findall(last)
    if len(pairs) < 3:  # the last line is part of the prompt
        lines, pairs = lines + [last], []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key.strip()] = value
        if key.strip() == "Size" and re.fullmatch(r"\d+x\d+", value):
            out["Size-1"], out["Size-2"] = value.split("x")
    return out


# --- responses --------------------------------------------------------------------------------------------------

def echoed(payload: dict) -> dict:
    """A1111's `parameters`: the request as sent, its images dropped unless include_init_images asks for them."""
    if payload.get("include_init_images") is True:
        return dict(payload)
    return {k: (None if k in ("init_images", "mask") else v) for k, v in payload.items()}


def a1111_info(p: dict, state) -> dict:
    """A1111's `info` (modules/processing.py Processed.js) from a finished job and its infotexts."""
    parsed = [parse_infotext(t) for t in state.infotexts]
    first = parsed[0] if parsed else {}
    seed = state.seeds[0] if state.seeds else p.get("seed", -1)

    def number(key: str, kind, default):
        return kind(first[key]) if key in first else default

    return {
        "prompt": state.prompts[0] if state.prompts else p.get("prompt", ""), "all_prompts": list(state.prompts),
        "negative_prompt": first.get("Negative prompt", p.get("negative_prompt", "")),
        "all_negative_prompts": [d["Negative prompt"] for d in parsed],
        "seed": seed, "all_seeds": list(state.seeds), "subseed": p.get("subseed", -1),
        "all_subseeds": [p.get("subseed", -1)] * len(state.seeds), "subseed_strength": 0.0,
        "width": state.width, "height": state.height,
        "sampler_name": first.get("Sampler", p.get("sampler_name")), "scheduler": first.get("Schedule type"),
        "cfg_scale": number("CFG scale", float, p.get("cfg_scale")), "steps": number("Steps", int, p.get("steps")),
        "batch_size": p.get("batch_size", 1), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"), "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": number("Denoising strength", float, p.get("denoising_strength")),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": list(state.infotexts),
        "styles": p.get("styles", []), "job_timestamp": "", "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "sdxl",
    }


def a1111_response(payload: dict, state, images: list[bytes], send_images: bool = True) -> dict:
    """The txt2img/img2img response: base64 PNGs (each carrying its infotext), the request echoed, info as JSON."""
    p = checked_fields(payload)
    return {"images": [base64.b64encode(b).decode("ascii") for b in images] if send_images else [],
            "parameters": echoed(payload), "info": json.dumps(a1111_info(p, state))}


# --- OpenAI -----------------------------------------------------------------------------------------------------

OPENAI_FIELDS = {"prompt": _STR, "n": _INT, "size": _STR, "response_format": _STR, "model": _STR}
OPENAI_MAX_N = 10  # OpenAI's own limit for n


def openai_settings(payload) -> tuple[dict, str | None]:
    """OpenAI's images/generations body (prompt, n, size "WxH", response_format b64_json, model) -> (Request
    settings, checkpoint name or None). Other fields (quality, style, user) are ignored."""
    if not isinstance(payload, dict):
        raise FieldError("body", f"expected a JSON object, got {type(payload).__name__}")
    p = {k: _typed(k, v, OPENAI_FIELDS[k]) for k, v in payload.items() if k in OPENAI_FIELDS and v is not None}
    if not p.get("prompt"):
        raise FieldError("prompt", "a prompt is required")
    if p.get("response_format", "b64_json") != "b64_json":
        raise FieldError("response_format", "only b64_json is served (no image URLs); send \"b64_json\"")
    n = p.get("n", 1)
    if not 1 <= n <= OPENAI_MAX_N:
        raise FieldError("n", f"must be in 1..{OPENAI_MAX_N}, got {n}")
    s = {"prompt": p["prompt"], "batch": n}
    size = p.get("size", "auto")
    if size != "auto":
        if not (m := re.fullmatch(r"(\d+)x(\d+)", size)):
            raise FieldError("size", f"must be WIDTHxHEIGHT such as 1024x1024, or auto, got {size!r:.40}")
        s["width"], s["height"] = int(m[1]), int(m[2])
    model = p.get("model")
    return s, None if model is None or model.startswith(("dall-e", "gpt-image")) else model


def openai_response(created: int, prompt: str, images: list[bytes]) -> dict:
    return {"created": created,
            "data": [{"b64_json": base64.b64encode(b).decode("ascii"), "revised_prompt": prompt} for b in images]}


# --- routes -----------------------------------------------------------------------------------------------------
# Mounted by sdxl.serve.app. Generation waits for its job (A1111's txt2img answers with the images); the waiting
# is asynchronous, so /progress, /interrupt and other requests are answered meanwhile.

router = APIRouter(tags=["AUTOMATIC1111"])
API = "/sdapi/v1"
POLL_SECONDS = 0.05


async def _body(request: Request, source: str):
    from starlette.requests import ClientDisconnect

    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):
        raise FieldError("body", f"{source}: the body is not valid JSON") from None
    except ClientDisconnect:  # the client hung up before its Content-Length: an answer nobody reads, no traceback
        raise FieldError("body", f"{source}: the client disconnected before sending the whole body") from None


def _decoder(request: Request):
    """`decode(bytes, field)` with sdxl.images' rules and the server's pixel limit."""
    limit = request.app.state.config.limits.max_image_pixels
    return lambda data, field: load_image(data, field, max_pixels=limit)


async def _finished(request: Request, spec: JobSpec, fields: dict):
    """Submit a job and wait for it; its state and the bytes of its PNGs. A 422 names the client's field (`fields`:
    ours -> theirs); a failed job is a 422 with its error where its input was at fault (a file it names that cannot
    be used), a 500 where the server was (jobs.INTERNAL)."""
    jobs = request.app.state.jobs
    with naming(fields=fields):
        job_id = await asyncio.to_thread(jobs.submit, spec)
    while (state := await asyncio.to_thread(jobs.get, job_id)).state in ("queued", "running"):
        await asyncio.sleep(POLL_SECONDS)
    if state.state == "failed":
        raise HTTPException(500 if state.error.startswith(INTERNAL) else 422, f"{spec.source} failed: {state.error}")
    return state, [Path(p).read_bytes() for p in state.images]  # an interrupted job: the images it finished


async def _generate(request: Request, kind: str) -> dict:
    payload = await _body(request, kind)
    spec = await asyncio.to_thread(job_spec, payload, kind, _decoder(request))
    if spec.vae is None and _options(request).get("sd_vae") not in (None, "Automatic", "None"):
        spec = replace(spec, vae=_options(request)["sd_vae"])  # the VAE chosen in options
    state, images = await _finished(request, spec, A1111_FIELDS)
    return a1111_response(payload, state, images, checked_fields(payload).get("send_images", True))


def body_schema() -> dict:
    """The OpenAPI schema of a txt2img/img2img body: the fields read here (any other is accepted and ignored)."""
    kinds = {_INT: "integer", _FLOAT: "number", _BOOL: "boolean", _STR: "string", "a list": "array",
             "an object": "object"}
    schema = {"type": "object", "properties": {k: {"type": [kinds[v], "null"]} for k, v in FIELDS.items()}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.post(f"{API}/txt2img", summary="A1111 txt2img: the images as base64 PNGs, the request, info as JSON",
             openapi_extra=body_schema())
async def txt2img(request: Request):
    return await _generate(request, "txt2img")


@router.post(f"{API}/img2img", summary="A1111 img2img and inpainting (init_images, mask)",
             openapi_extra=body_schema())
async def img2img(request: Request):
    return await _generate(request, "img2img")


@router.post("/v1/images/generations", tags=["OpenAI"], summary="OpenAI images/generations (b64_json)")
async def openai_generations(request: Request):
    settings, model = openai_settings(await _body(request, "images/generations"))
    spec = JobSpec(settings, model=model, source="images/generations")
    state, images = await _finished(request, spec, {"batch": "n", "width": "size", "height": "size", "model": "model"})
    return openai_response(int(time.time()), settings["prompt"], images)


def _checkpoints(models) -> list:
    return [m for m in models.list("checkpoints") if m.refused is None]


def _title(models) -> str:
    """The current checkpoint as A1111 names it in options: "name [hash]"."""
    return next((m.title for m in _checkpoints(models) if m.name == models.current), models.current)


def _options(request: Request) -> dict:
    """The options set by POST /options (besides the model, which the models folder keeps)."""
    return getattr(request.app.state, "a1111_options", {})


@router.get(f"{API}/options")
def get_options(request: Request):
    models = request.app.state.models
    current = next((m for m in _checkpoints(models) if m.name == models.current), None)
    return {"sd_vae": "Automatic", "samples_format": "png", "CLIP_stop_at_last_layers": 1} | _options(request) | {
        "sd_model_checkpoint": _title(models), "sd_checkpoint_hash": file_hash(current.path) if current else None,
        "outdir_samples": str(request.app.state.config.output_dir)}


@router.post(f"{API}/options")
async def set_options(request: Request):
    """Options are kept (and shown by GET); sd_model_checkpoint and sd_vae choose what later jobs use."""
    body = await _body(request, "options")
    if not isinstance(body, dict):
        raise FieldError("body", "expected a JSON object of options")
    for k, v in body.items():  # kept and shown by GET: a NaN stored here would break every later GET
        if (bad := _non_finite(v)) is not None:
            raise FieldError(k, f"must be a finite number, got {bad}")
    models = request.app.state.models
    name = body.get("sd_model_checkpoint")
    if name is not None:
        if type(name) is not str:
            raise FieldError("sd_model_checkpoint", "must be a string (a title from GET /sdapi/v1/sd-models)")
        with naming("sd_model_checkpoint"):
            models.switch(name)
    vae = body.get("sd_vae")
    if vae is not None and type(vae) is not str:
        raise FieldError("sd_vae", "must be a string (a name from GET /sdapi/v1/sd-vae, or Automatic)")
    if vae not in (None, "Automatic", "None"):
        with naming("sd_vae"):
            models.resolve("vae", vae, "sd_vae")
    request.app.state.a1111_options = _options(request) | {k: v for k, v in body.items() if k != "sd_model_checkpoint"}
    return None


@router.get(f"{API}/sd-models")
def sd_models(request: Request):
    return [{"title": m.title, "model_name": m.name.rsplit(".", 1)[0], "hash": m.hash, "sha256": file_hash(m.path),
             "filename": str(m.path), "config": None} for m in _checkpoints(request.app.state.models)]


@router.get(f"{API}/sd-vae")
def sd_vae(request: Request):
    return [{"model_name": m.name, "filename": str(m.path)}
            for m in request.app.state.models.list("vae") if m.refused is None]


@router.get(f"{API}/loras")
def loras(request: Request):
    """The loras folder as A1111 lists it (extensions-builtin/Lora/lora_script.py create_lora_json, network.py
    NetworkOnDisk, v1.10.1): `name` the file's stem, `alias` its ss_output_name (else the stem), `path`, `metadata`
    the file's; a prompt takes either, or `sub/NAME` where two files share a stem (sdxl.adapters.tags.find_lora)."""
    from sdxl.formats.files import SafetensorsFile

    out = []
    for m in (m for m in request.app.state.models.list("loras") if m.refused is None):
        try:
            meta = SafetensorsFile(m.path).metadata
        except SDXLError:  # a broken header: listed by its name; using it gives the reason
            meta = {}
        out.append({"name": m.path.stem, "alias": meta.get("ss_output_name", m.path.stem), "path": str(m.path),
                    "metadata": meta})
    return out


@router.get(f"{API}/embeddings")
def embeddings(request: Request):
    """The embeddings folder checked against the current checkpoint's text encoders (sdxl.adapters.embeddings):
    `loaded` by the name a prompt uses, `skipped` the files refused, each with A1111's fields and the `reason`."""
    from sdxl.adapters.embeddings import SDXL_WIDTHS, checkpoint_widths, load_folder

    models = request.app.state.models
    folder = models.folder("embeddings")
    if folder is None:
        return {"loaded": {}, "skipped": {}}
    try:
        widths = checkpoint_widths(models.resolve("checkpoints", models.current, "model"))
    except SDXLError:  # a checkpoint that will not load either: the embeddings are checked against SDXL's widths
        widths = SDXL_WIDTHS
    found = load_folder(folder, widths)
    blank = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0, "vectors": 0}
    return {"loaded": {name: e.as_dict() for name, e in found.loaded.items()},
            "skipped": {name: blank | {"reason": why} for name, why in found.skipped.items()}}


@router.post(f"{API}/refresh-checkpoints")
@router.post(f"{API}/refresh-loras")
@router.post(f"{API}/refresh-embeddings")
def refresh():
    """The folders are read on every listing, so there is nothing to refresh."""
    return None


@router.get(f"{API}/samplers")
def samplers():
    return [{"name": display, "aliases": [ours], "options": {}} for ours, display in names.A1111_SAMPLERS.items()]


@router.get(f"{API}/schedulers")
def schedulers():
    rows = [("automatic", "Automatic")] + list(names.A1111_SCHEDULES.items())
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1.0, "need_inner_model": False}
            for name, label in rows]


@router.get(f"{API}/upscalers")
def upscalers():
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": None}
            for n in PIXEL_UPSCALERS]


@router.get(f"{API}/latent-upscale-modes")
def latent_upscale_modes():
    return [{"name": n} for n in LATENT_UPSCALERS]


@router.get(f"{API}/scripts")
def scripts():
    return {"txt2img": [], "img2img": []}


@router.get(f"{API}/prompt-styles")
def prompt_styles():
    return []


@router.get(f"{API}/progress")
def progress(request: Request, skip_current_image: bool = False):
    """The running job: progress 0..1, ETA, A1111's state dict, the preview as base64 PNG."""
    s = request.app.state.jobs.current()
    flags = getattr(request.app.state, "a1111_stopped", {})  # which job /interrupt or /skip last stopped
    if s is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": progress_state(None, flags), "current_image": None,
                "textinfo": None}
    started = _started(request, s.id)
    done = s.step / s.total if s.total else 0.0
    elapsed = time.monotonic() - started
    image = base64.b64encode(s.preview).decode("ascii") if s.preview and not skip_current_image else None
    return {"progress": done, "eta_relative": elapsed / done - elapsed if done else 0.0,
            "state": progress_state(s, flags), "current_image": image,
            "textinfo": f"step {s.step} of {s.total}"}


def progress_state(s, stopped: dict) -> dict:
    """A1111's shared.state.dict() for a JobState (None: idle)."""
    return {"skipped": s is not None and stopped.get("skip") == s.id,
            "interrupted": s is not None and stopped.get("interrupt") == s.id, "stopping_generation": False,
            "job": s.id if s else "", "job_count": s.job_count if s else 0, "job_timestamp": "", "job_no": 0,
            "sampling_step": s.step if s else 0, "sampling_steps": s.total if s else 0}


def _started(request: Request, job_id: str) -> float:
    """When /progress first saw the running job (for the ETA)."""
    seen = getattr(request.app.state, "a1111_started", (None, 0.0))
    if seen[0] != job_id:
        seen = request.app.state.a1111_started = (job_id, time.monotonic())
    return seen[1]


def _stop(request: Request, how: str) -> dict:
    jobs = request.app.state.jobs
    s = jobs.current()
    if s is not None:
        request.app.state.a1111_stopped = {how: s.id}
    jobs.interrupt() if how == "interrupt" else jobs.skip()
    return {}


@router.post(f"{API}/interrupt")
def interrupt(request: Request):
    return _stop(request, "interrupt")


@router.post(f"{API}/skip")
def skip(request: Request):
    return _stop(request, "skip")


@router.post(f"{API}/png-info")
async def png_info(request: Request):
    """A PNG's infotext, parsed, and its other text chunks (the sdxl recipe among them)."""
    body = await _body(request, "png-info")
    data = image_bytes(body.get("image") if isinstance(body, dict) else None, "image")
    if not data:
        raise FieldError("image", "send the PNG as base64 or a data: URL")
    limit = request.app.state.config.limits.max_image_pixels
    with opened(data, "image", max_pixels=limit) as im:
        text = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
    info = text.pop("parameters", "")
    return {"info": info, "items": text, "parameters": parse_infotext(info) if info else {}}


@router.get(f"{API}/memory")
def memory():
    """RAM of this machine and, on a CUDA device, its memory (A1111's shape)."""
    page, total = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
    free = os.sysconf("SC_AVPHYS_PAGES") * page
    ram = {"free": free, "used": total * page - free, "total": total * page}
    import torch

    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free_c, total_c = torch.cuda.mem_get_info()
    return {"ram": ram, "cuda": {"system": {"free": free_c, "used": total_c - free_c, "total": total_c},
                                 "allocated": {"current": torch.cuda.memory_allocated(),
                                               "peak": torch.cuda.max_memory_allocated()}}}
