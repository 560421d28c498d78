"""The AUTOMATIC1111 API and OpenAI's images/generations (sdxl.serve.a1111): the pure mapping of request bodies
to job settings, then the real `webuiapi` client against a live server on 127.0.0.1 with the default model."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_fixtures import live_server, served, tiny_models  # noqa: F401  (fixtures)

from sdxl.cli import main
from sdxl.errors import SDXLError
from sdxl.serve import a1111
from sdxl.serve.a1111 import FieldError


def _settings(payload: dict, kind: str = "txt2img") -> dict:
    return a1111.request_settings(a1111.checked_fields(payload), kind)


# --- sampler names ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, scheduler, sampler, schedule", [
    ("DPM++ 2M Karras", None, "dpmpp_2m", "karras"),      # the pre-1.9 single name
    ("DPM++ 2M", "Karras", "dpmpp_2m", "karras"),         # 1.9+: sampler + schedule type
    ("DPM++ 2M", "Automatic", "dpmpp_2m", "sgm"),
    ("DPM++ 2M", "automatic", "dpmpp_2m", "sgm"),         # webuiapi's default scheduler
    ("Euler a", None, "euler_ancestral", "sgm"),
    ("DPM++ SDE", "Exponential", "dpmpp_sde", "exponential"),
    ("DPM++ SDE Karras", None, "dpmpp_sde", "karras"),
    ("Euler", "SGM Uniform", "euler", "sgm_uniform"),
    ("dpmpp_2m", "karras", "dpmpp_2m", "karras"),          # our own names
])
def test_sampler_names(name, scheduler, sampler, schedule):
    payload = {"prompt": "x", "sampler_name": name} | ({"scheduler": scheduler} if scheduler else {})
    s = _settings(payload)
    assert (s["sampler"], s["schedule"]) == (sampler, schedule)


def test_sampler_index_when_no_sampler_name():
    assert _settings({"sampler_index": "DPM2 a"})["sampler"] == "dpm_2_ancestral"
    assert _settings({"sampler_index": "Euler", "sampler_name": "Heun"})["sampler"] == "heun"


def test_unknown_sampler_and_scheduler_name_their_field():
    with pytest.raises(FieldError) as e:
        _settings({"sampler_name": "Restart"})
    assert e.value.field == "sampler_name" and "DPM++ 2M" in str(e.value)
    with pytest.raises(FieldError) as e:
        _settings({"sampler_name": "Euler", "scheduler": "Align Your Steps"})
    assert e.value.field == "scheduler"


# --- fields -----------------------------------------------------------------------------------------------------

def test_fields_map_onto_request_settings():
    s = _settings({"prompt": "a red circle", "negative_prompt": "blue", "seed": 7, "steps": 12, "cfg_scale": 6,
                   "width": 128, "height": 96, "batch_size": 2, "styles": ["ignored"], "unknown_field": {"x": 1},
                   "eta": 1.0, "s_churn": 0, "subseed": 5, "subseed_strength": 0, "send_images": True})
    assert s == {"prompt": "a red circle", "negative_prompt": "blue", "seed": 7, "steps": 12, "cfg": 6.0,
                 "width": 128, "height": 96, "batch": 2}


def test_nulls_mean_the_default_and_integral_floats_are_integers():
    assert _settings({"prompt": "x", "steps": None, "width": 128.0}) == {"prompt": "x", "width": 128}


@pytest.mark.parametrize("field, value, words", [
    ("steps", "20", "an integer"), ("seed", 1.5, "an integer"), ("cfg_scale", "7", "a number"),
    ("width", True, "an integer"), ("prompt", 3, "a string"), ("enable_hr", "yes", "a boolean"),
    ("override_settings", [], "an object"), ("init_images", "abc", "a list"),
])
def test_wrong_types_name_the_field(field, value, words):
    with pytest.raises(FieldError) as e:
        a1111.checked_fields({field: value})
    assert e.value.field == field and words in str(e.value)


def test_img2img_strength_defaults_as_a1111():
    assert _settings({"prompt": "x"}, "img2img")["strength"] == 0.75
    assert _settings({"prompt": "x", "denoising_strength": 0.3}, "img2img")["strength"] == 0.3
    assert "strength" not in _settings({"prompt": "x", "denoising_strength": 0.3})  # txt2img: hires only


@pytest.mark.parametrize("payload, expected", [
    ({"enable_hr": True}, {"hires_scale": 2.0, "hires_upscale": "latent", "hires_strength": 0.75}),
    ({"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)", "hr_second_pass_steps": 5,
      "denoising_strength": 0.4}, {"hires_scale": 1.5, "hires_upscale": "latent", "hires_steps": 5,
                                   "hires_strength": 0.4}),
    ({"enable_hr": True, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 0},
     {"hires_scale": 2.0, "hires_upscale": "pixel", "hires_strength": 0.75}),
    ({"enable_hr": True, "width": 128, "height": 96, "hr_resize_x": 192, "denoising_strength": 0.5},
     {"hires_scale": 1.5, "hires_upscale": "latent", "width": 128, "height": 96, "hires_strength": 0.5}),
    ({"enable_hr": True, "width": 128, "height": 96, "hr_resize_x": 256, "hr_resize_y": 192, "denoising_strength": 0.5},
     {"hires_scale": 2.0, "hires_upscale": "latent", "width": 128, "height": 96, "hires_strength": 0.5}),
    ({"enable_hr": False, "hr_scale": 3, "hr_upscaler": "R-ESRGAN 4x+"}, {}),
])
def test_hires_fix(payload, expected):
    assert _settings(payload) == {"prompt": ""} | expected


@pytest.mark.parametrize("payload, field", [
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"enable_hr": True, "width": 128, "height": 96, "hr_resize_x": 256, "hr_resize_y": 256}, "hr_resize_x"),
    ({"enable_hr": True, "hr_resize_x": 256}, "hr_resize_x"),
    ({"enable_hr": True, "hr_prompt": "another"}, "hr_prompt"),
    ({"enable_hr": True, "hr_sampler_name": "Heun", "sampler_name": "Euler"}, "hr_sampler_name"),
])
def test_hires_options_it_cannot_honour(payload, field):
    with pytest.raises(FieldError) as e:
        _settings(payload)
    assert e.value.field == field


def test_hires_same_prompt_and_sampler_accepted():
    s = _settings({"prompt": "p", "enable_hr": True, "hr_prompt": "p", "hr_sampler_name": "Use same sampler",
                   "hr_checkpoint_name": "Use same checkpoint"})
    assert s["hires_scale"] == 2.0


def test_job_spec_of_a_webuiapi_body():
    body = {"prompt": "a cat <lora:style:0.5>", "sampler_name": "DPM++ 2M Karras", "scheduler": "Automatic",
            "sampler_index": "Euler a", "steps": 3, "n_iter": 2, "seed": -1, "override_settings": {}, "styles": [],
            "refiner_checkpoint": "tiny_refiner", "refiner_switch_at": 0.6, "send_images": True}
    spec = a1111.job_spec(body, "txt2img", _decode)
    assert spec.settings == {"prompt": "a cat <lora:style:0.5>", "seed": -1, "steps": 3, "sampler": "dpmpp_2m",
                             "schedule": "karras", "refiner_switch": 0.6}  # the queue takes the <lora:> tags out
    assert (spec.n_iter, spec.refiner, spec.model, spec.init_image, spec.source) == (2, "tiny_refiner", None, None,
                                                                                   "txt2img")


def test_models_and_refiner():
    p = a1111.checked_fields({"override_settings": {"sd_model_checkpoint": "base.safetensors [0123456789]",
                                                    "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 2},
                              "refiner_checkpoint": "refiner.safetensors", "refiner_switch_at": 0.7})
    assert a1111.model_choice(p) == {"model": "base.safetensors [0123456789]", "refiner": "refiner.safetensors"}
    assert a1111.request_settings(p, "txt2img")["refiner_switch"] == 0.7
    p = a1111.checked_fields({"override_settings": {"sd_vae": "my.vae.safetensors"}, "refiner_checkpoint": ""})
    assert a1111.model_choice(p) == {"vae": "my.vae.safetensors"}
    assert "refiner_switch" not in a1111.request_settings(p, "txt2img")


@pytest.mark.parametrize("value, refiner", [(None, None), ("", None), ("None", "none"), ("none", "none"),
                                            ("tiny_refiner", "tiny_refiner")])
def test_refiner_checkpoint_none_turns_the_refiner_off(value, refiner):
    """"None"/"none" (A1111's "no refiner") also turns off a built-in refiner; absent, null or "" leave the
    model's default."""
    p = a1111.checked_fields({"prompt": "x"} | ({} if value is None else {"refiner_checkpoint": value}))
    assert a1111.model_choice(p).get("refiner") == refiner
    assert "refiner_switch" not in a1111.request_settings(p, "txt2img")  # 0.8 where a refiner loads (with_defaults)
    at = a1111.request_settings(a1111.checked_fields(dict(p) | {"refiner_switch_at": 0.5}), "txt2img")
    assert at.get("refiner_switch") == (None if refiner == "none" else 0.5)  # the built-in refiner's switch too
    with pytest.raises(FieldError) as e:
        a1111.model_choice({"override_settings": {"sd_model_checkpoint": 3}})
    assert e.value.field == "override_settings.sd_model_checkpoint"


@pytest.mark.parametrize("payload, field", [
    ({"restore_faces": True}, "restore_faces"), ({"tiling": True}, "tiling"),
    ({"subseed_strength": 0.5}, "subseed_strength"), ({"script_name": "x/y/z plot"}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
    ({"seed_resize_from_w": 512}, "seed_resize_from_w"), ({"firstphase_width": 512}, "firstphase_width"),
    ({"n_iter": 0}, "n_iter"),
])
def test_refused_options(payload, field):
    with pytest.raises(FieldError) as e:
        a1111.refused(a1111.checked_fields(payload))
    assert e.value.field == field


def test_defaults_webuiapi_sends_are_not_refused():
    a1111.refused(a1111.checked_fields({"restore_faces": False, "tiling": False, "subseed": -1,
                                        "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
                                        "script_name": None, "alwayson_scripts": {}}))


# --- images -----------------------------------------------------------------------------------------------------

def _b64(im: Image.Image, data_url: bool = False) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def _decode(data: bytes, field: str) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _image_and_mask():
    image = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return image, mask


def test_base64_and_data_urls_decode_to_the_same_bytes():
    image, _ = _image_and_mask()
    assert a1111.image_bytes(_b64(image), "x") == a1111.image_bytes(_b64(image, True), "x")


@pytest.mark.parametrize("text, words", [
    ("https://example.com/a.png", "never fetched"), ("file:///etc/passwd", "never fetched"),
    ("not base64!", "not valid base64"), ("data:image/png;base64,abc", "not valid base64"), (3, "base64 string"),
])
def test_bad_images_are_refused(text, words):
    with pytest.raises(SDXLError) as e:
        a1111.image_bytes(text, "init_images")
    assert e.value.field == "init_images" and words in str(e.value)


def test_init_image_passes_through_untouched_when_nothing_applies():
    image, mask = _image_and_mask()
    p = a1111.checked_fields({"init_images": [_b64(image, True)], "mask": _b64(mask), "mask_blur": 0,
                              "inpainting_fill": 1, "inpaint_full_res": False})
    init, m = a1111.inpaint_inputs(p, _decode)
    assert np.array_equal(np.asarray(_decode(init, "")), np.asarray(image))
    assert np.array_equal(np.asarray(_decode(m, "")), np.asarray(mask))


def test_mask_invert_blur_and_fill():
    image, mask = _image_and_mask()
    p = a1111.checked_fields({"init_images": [_b64(image)], "mask": _b64(mask), "mask_blur": 4,
                              "inpainting_fill": 0, "inpainting_mask_invert": 1, "inpaint_full_res": False})
    init, m = (np.asarray(_decode(b, "")) for b in a1111.inpaint_inputs(p, _decode))
    assert m[32, 32] == 0 and m[2, 2] == 255  # inverted: the border is repainted
    assert set(np.unique(m)) == {0, 255}  # not blurred here: the blur is the pipeline's, as for the CLI
    assert a1111.job_spec(p, "img2img", _decode).settings["mask_blur"] == 4
    # fill: inside the (inverted) mask's kept square the pixels are the original; the border got blurred colours
    assert np.array_equal(init[24:40, 24:40], np.asarray(image)[24:40, 24:40])
    assert not np.array_equal(init[:4], np.asarray(image)[:4])


def test_transparent_mask_uses_its_opacity():
    image, _ = _image_and_mask()
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 16, 64))  # painted strokes on a transparent layer, as canvases send
    p = a1111.checked_fields({"init_images": [_b64(image)], "mask": _b64(layer), "mask_blur": 0, "inpainting_fill": 1,
                              "inpaint_full_res": False})
    m = np.asarray(_decode(a1111.inpaint_inputs(p, _decode)[1], ""))
    assert m[:, :16].min() == 255 and m[:, 16:].max() == 0


def test_crop_and_resize_fits_image_and_mask_alike():
    image = Image.new("RGB", (100, 50), (200, 0, 0))
    mask = Image.new("L", (100, 50), 255)
    p = a1111.checked_fields({"init_images": [_b64(image)], "mask": _b64(mask), "resize_mode": 1, "width": 64,
                              "height": 64, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False})
    init, m = (_decode(b, "") for b in a1111.inpaint_inputs(p, _decode))
    assert init.size == m.size == (64, 64)


@pytest.mark.parametrize("extra, field", [
    ({"inpaint_full_res": True}, "inpaint_full_res"),   # webuiapi's default: "only masked"
    ({"inpainting_fill": 2}, "inpainting_fill"), ({"resize_mode": 2}, "resize_mode"),
    ({"init_images": []}, "init_images"),
])
def test_img2img_options_it_cannot_honour(extra, field):
    image, mask = _image_and_mask()
    p = a1111.checked_fields({"init_images": [_b64(image)], "mask": _b64(mask), "inpaint_full_res": False} | extra)
    with pytest.raises(FieldError) as e:
        a1111.inpaint_inputs(p, _decode)
    assert e.value.field == field


# --- infotext and responses -------------------------------------------------------------------------------------

def test_parse_infotext():
    text = ('a red circle\nsecond line\nNegative prompt: blue\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, '
            'CFG scale: 5.0, Seed: 3, Size: 128x96, Model: default_base, Lora hashes: "a: 1, b: 2"')
    d = a1111.parse_infotext(text)
    assert d["Prompt"] == "a red circle\nsecond line" and d["Negative prompt"] == "blue"
    assert d["Steps"] == "20" and d["Sampler"] == "DPM++ 2M" and d["Schedule type"] == "Karras"
    assert d["Size-1"] == "128" and d["Size-2"] == "96" and d["Lora hashes"] == "a: 1, b: 2"
    assert a1111.parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


class _State:  # what Jobs.get returns, as far as the response reads it
    infotexts = ("a\nSteps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 5.0, Seed: 3, Size: 128x128",
                 "a\nSteps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 5.0, Seed: 4, Size: 128x128")
    seeds, prompts, width, height = (3, 4), ("a", "a"), 128, 128


def test_a1111_response_shape():
    payload = {"prompt": "a", "seed": 3, "batch_size": 2, "init_images": ["xx"], "whatever": 1}
    r = a1111.a1111_response(payload, _State(), [b"png0", b"png1"])
    assert [base64.b64decode(i) for i in r["images"]] == [b"png0", b"png1"]
    assert r["parameters"] == {"prompt": "a", "seed": 3, "batch_size": 2, "init_images": None, "whatever": 1}
    info = json.loads(r["info"])
    assert info["seed"] == 3 and info["all_seeds"] == [3, 4] and info["all_prompts"] == ["a", "a"]
    assert info["infotexts"] == list(_State.infotexts) and (info["width"], info["height"]) == (128, 128)
    assert (info["sampler_name"], info["cfg_scale"], info["steps"]) == ("Euler a", 5.0, 20)
    assert a1111.a1111_response(payload | {"send_images": False}, _State(), [b"x"], False)["images"] == []


# --- OpenAI -----------------------------------------------------------------------------------------------------

def test_openai_mapping():
    s, model = a1111.openai_settings({"prompt": "a", "n": 2, "size": "128x96", "response_format": "b64_json",
                                      "model": "dall-e-3", "quality": "hd"})
    assert s == {"prompt": "a", "batch": 2, "width": 128, "height": 96} and model is None
    assert a1111.openai_settings({"prompt": "a", "model": "mine.safetensors"})[1] == "mine.safetensors"
    for bad, field in (({"prompt": "a", "response_format": "url"}, "response_format"), ({"n": 1}, "prompt"),
                       ({"prompt": "a", "size": "big"}, "size"), ({"prompt": "a", "n": 11}, "n"),
                       ({"prompt": "a", "n": "2"}, "n")):
        with pytest.raises(FieldError) as e:
            a1111.openai_settings(bad)
        assert e.value.field == field


# --- the real webuiapi client against a live server -------------------------------------------------------------

TINY = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def api(served):
    webuiapi = pytest.importorskip("webuiapi")
    return webuiapi.WebUIApi(host="127.0.0.1", port=served.config.port)


def _cli(tmp_path, capsys, tiny_models, *flags) -> list[Image.Image]:
    out = tmp_path / "cli.png"
    code = main(["generate", *flags, "--model", str(tiny_models / "checkpoints" / "tiny.safetensors"), "--steps", "2",
                 "--width", "64", "--height", "64", "--dtype", "fp32", "--device", "cpu", "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    return [Image.open(p) for p in sorted(tmp_path.glob("cli*.png"))]


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_txt2img_equals_the_cli(api, tiny_models, tmp_path, capsys):
    r = api.txt2img(prompt="a green square", negative_prompt="red", seed=11, cfg_scale=4, sampler_name="DPM++ 2M",
                    scheduler="Karras", batch_size=2, **TINY)
    cli = _cli(tmp_path, capsys, tiny_models, "a green square", "--negative", "red", "--seed", "11", "--cfg", "4",
               "--sampler", "dpmpp_2m", "--scheduler", "karras", "--batch", "2")
    assert len(r.images) == 2 and all(_same(a, b) for a, b in zip(r.images, cli))
    assert [im.info["parameters"] for im in r.images] == [im.info["parameters"] for im in cli]
    assert r.info["all_seeds"] == [11, 12] and r.info["seed"] == 11 and r.info["infotexts"][0] == cli[0].info[
        "parameters"]
    assert (r.info["sampler_name"], r.info["scheduler"], r.info["steps"], r.info["cfg_scale"]) == (
        "DPM++ 2M", "Karras", 2, 4.0)
    assert r.parameters["prompt"] == "a green square" and r.parameters["sampler_name"] == "DPM++ 2M"


def test_old_style_sampler_name_gives_the_same_image(api):
    a = api.txt2img(prompt="p", seed=3, sampler_name="DPM++ 2M Karras", **TINY)
    b = api.txt2img(prompt="p", seed=3, sampler_name="DPM++ 2M", scheduler="Karras", **TINY)
    assert _same(a.image, b.image) and "Schedule type: Karras" in a.info["infotexts"][0]


def test_img2img_with_a_mask_equals_the_cli(api, tiny_models, tmp_path, capsys):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    r = api.img2img(images=[init], mask_image=mask, prompt="paint", seed=4, denoising_strength=0.8, mask_blur=0,
                    inpainting_fill=1, inpaint_full_res=False, cfg_scale=5, sampler_name="Euler", **TINY)
    (tmp_path / "out").mkdir()
    cli = _cli(tmp_path / "out", capsys, tiny_models, "paint", "--seed", "4", "--init-image", str(tmp_path / "init.png"),
               "--mask", str(tmp_path / "mask.png"), "--strength", "0.8", "--cfg", "5", "--mask-blur", "0")
    assert _same(r.image, cli[0]) and r.image.info["parameters"] == cli[0].info["parameters"]
    assert np.array_equal(np.asarray(r.image)[:, 40:], np.asarray(init)[:, 40:])  # outside the mask: kept
    assert r.parameters["init_images"] is None  # not echoed back unless include_init_images


def test_img2img_fill_blur_and_invert_run(api):
    init = Image.new("RGB", (64, 64), (20, 200, 20))
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (16, 16, 48, 48))
    r = api.img2img(images=[init], mask_image=mask, prompt="x", seed=1, inpainting_mask_invert=1,
                    inpaint_full_res=False, **TINY)  # webuiapi's fill and mask_blur 4
    a = np.asarray(r.image).astype(int)
    assert r.image.size == (64, 64) and np.abs(a[0, 0] - [20, 200, 20]).max() <= 3  # inverted: the border is kept


def test_img2img_refuses_what_it_cannot_do(api):
    init, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    with pytest.raises(RuntimeError) as e:
        api.img2img(images=[init], mask_image=mask, prompt="x", **TINY)  # webuiapi's default: only masked
    assert e.value.args[0] == 422 and json.loads(e.value.args[1])["field"] == "inpaint_full_res"
    with pytest.raises(RuntimeError) as e:
        api.img2img(images=[init], mask_image=mask, inpainting_fill=2, inpaint_full_res=False, **TINY)
    assert json.loads(e.value.args[1])["field"] == "inpainting_fill"


def test_options_refuse_non_finite_values_and_stay_readable(served):
    r = httpx.post(f"{served.url}/sdapi/v1/options", content='{"CLIP_stop_at_last_layers": NaN}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "CLIP_stop_at_last_layers", r.text
    assert httpx.get(f"{served.url}/sdapi/v1/options", timeout=60).status_code == 200


def test_options_switch_the_model(api, served, tiny_models):
    shutil.copy(tiny_models / "checkpoints" / "tiny.safetensors", tiny_models / "checkpoints" / "other.safetensors")
    titles = api.util_get_model_names()
    assert any(t.startswith("other.safetensors [") for t in titles)
    assert api.util_get_current_model().startswith("tiny.safetensors [")
    try:
        api.util_set_model("other")  # webuiapi picks the closest title and posts it as sd_model_checkpoint
        assert api.util_get_current_model().startswith("other.safetensors [")
        r = api.txt2img(prompt="p", seed=1, **TINY)
        assert "Model: other," in r.info["infotexts"][0]
        for option in ("sd_model_checkpoint", "sd_vae"):
            bad = httpx.post(f"{served.url}/sdapi/v1/options", json={option: "nope"})
            assert bad.status_code == 422 and bad.json()["field"] == option and "nope" in bad.json()["detail"]
        assert api.get_options()["sd_vae"] == "Automatic"
        one = api.txt2img(prompt="p", seed=1, override_settings={"sd_model_checkpoint": "tiny"}, **TINY)
        assert "Model: tiny," in one.info["infotexts"][0]
    finally:
        api.set_options({"sd_model_checkpoint": "tiny.safetensors"})
    assert api.util_get_current_model().startswith("tiny.safetensors [")


def test_listings(api, served):
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE"} <= set(names)
    assert {"automatic", "karras", "exponential", "sgm_uniform"} <= set(api.util_get_scheduler_names())
    assert [x["name"] for x in api.get_loras()] == ["style"]
    assert [x["name"] for x in api.get_upscalers()] == list(a1111.PIXEL_UPSCALERS)
    assert [x["name"] for x in api.get_latent_upscale_modes()][0] == "Latent"
    assert api.get_sd_vae() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_memory()["ram"]["total"] > 0
    assert api.refresh_checkpoints() is None
    assert httpx.post(f"{served.url}/sdapi/v1/refresh-loras").status_code == 200


def test_lora_in_the_prompt(api):
    plain = api.txt2img(prompt="a cat", seed=5, **TINY)
    tagged = api.txt2img(prompt="a cat <lora:style:0.8>", seed=5, **TINY)
    assert not _same(plain.image, tagged.image) and tagged.info["all_prompts"] == ["a cat"]


def test_progress_and_interrupt(api):
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=api.txt2img(prompt="long", seed=2, steps=400,
                                                                          width=64, height=64)))
    worker.start()
    end = time.monotonic() + 120
    while (p := api.get_progress())["state"]["sampling_step"] < 2 and time.monotonic() < end:
        time.sleep(0.02)
    assert p["state"]["sampling_steps"] == 400 and 0 < p["progress"] < 1 and p["state"]["job_count"] >= 1
    assert Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).mode == "RGB"
    assert p["eta_relative"] >= 0 and p["textinfo"].startswith("step ")
    assert api.interrupt() == {}
    worker.join(timeout=120)
    assert result["r"].images == [] and result["r"].info["all_seeds"] == []
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_skip_goes_on_with_the_next_run(api):
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=api.txt2img(prompt="two runs", seed=30, n_iter=2,
                                                                          steps=60, width=64, height=64)))
    worker.start()
    end = time.monotonic() + 120
    while (p := api.get_progress())["state"]["sampling_step"] < 1 and time.monotonic() < end:
        time.sleep(0.02)
    assert p["state"]["sampling_steps"] == 120
    api.skip()
    assert api.get_progress()["state"]["skipped"] is True
    worker.join(timeout=300)
    assert result["r"].info["all_seeds"] == [31] and len(result["r"].images) == 1  # run 0 (seed 30) skipped


def test_openapi_documents_the_a1111_body(served):
    schema = httpx.get(f"{served.url}/openapi.json").json()
    body = schema["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["steps"]["type"] == ["integer", "null"]
    assert set(a1111.FIELDS) == set(body["properties"])
    assert "/v1/images/generations" in schema["paths"] and "/sdapi/v1/img2img" in schema["paths"]


def test_png_info(api):
    r = api.txt2img(prompt="a blue star", negative_prompt="green", seed=21, **TINY)
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]
    assert info.parameters["Prompt"] == "a blue star" and info.parameters["Negative prompt"] == "green"
    assert info.parameters["Seed"] == "21" and info.parameters["Size-1"] == "64"
    assert json.loads(info.json["items"]["sdxl-recipe"])["seed"] == 21


@pytest.mark.parametrize("body, field", [
    ({"steps": "two"}, "steps"), ({"cfg_scale": [1]}, "cfg_scale"), ({"width": 64.5}, "width"),
    ({"override_settings": {"sd_model_checkpoint": 1}}, "override_settings.sd_model_checkpoint"),
    ({"restore_faces": True}, "restore_faces"), ({"sampler_name": "Restart"}, "sampler_name"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"), ({"steps": 501}, "steps"),
    # Request's rules and the server's limits, named as the client sent them
    ({"cfg_scale": 1000}, "cfg_scale"), ({"batch_size": 65}, "batch_size"), ({"width": 60}, "width"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ({"prompt": "x <lora:nope:1>"}, "prompt"), ({"refiner_checkpoint": "nope"}, "refiner_checkpoint"),
    ({"enable_hr": True, "hr_scale": 0.5}, "hr_scale"),
])
def test_bad_fields_are_a_422_naming_the_field(served, body, field):
    r = httpx.post(f"{served.url}/sdapi/v1/txt2img", json={"prompt": "x"} | TINY | body, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


@pytest.mark.parametrize("field", ["denoising_strength", "hr_scale", "refiner_switch_at", "cfg_scale", "not_ours"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_a_422_naming_the_field(served, field, value):
    # Python's JSON reads NaN/Infinity; such a value, even in a field we ignore, would break the echoed response
    body = '{"prompt": "x", "steps": 2, "width": 64, "height": 64, "%s": %s}' % (field, value)
    r = httpx.post(f"{served.url}/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 422 and r.json()["field"] == field and "finite" in r.json()["detail"], r.text


def test_mask_blur_out_of_range_is_a_422_naming_it(served):
    image, mask = _image_and_mask()
    body = {"prompt": "x", "init_images": [_b64(image)], "mask": _b64(mask), "inpaint_full_res": False,
            "mask_blur": -1} | TINY
    r = httpx.post(f"{served.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "mask_blur", r.text


def test_hires_fix_through_the_api(api):
    r = api.txt2img(prompt="big", seed=3, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1,
                    denoising_strength=0.5, **TINY)
    assert r.image.size == (96, 96) and "Hires upscale: 1.5" in r.info["infotexts"][0]


def test_openai_images_generations(served):
    r = httpx.post(f"{served.url}/v1/images/generations", timeout=120,
                   json={"prompt": "a red circle", "n": 2, "size": "64x64", "response_format": "b64_json",
                         "model": "dall-e-3"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
    assert len(images) == 2 and images[0].size == (64, 64) and "a red circle" in images[0].info["parameters"]
    for body, field in (({"response_format": "url"}, "response_format"), ({"size": "60x60"}, "size"),
                        ({"n": 65}, "n")):
        bad = httpx.post(f"{served.url}/v1/images/generations", json={"prompt": "x"} | body)
        assert bad.status_code == 422 and bad.json()["field"] == field, bad.text


def test_default_model_with_its_refiner_equals_the_cli(tmp_path, capsys):
    """`sdxl serve` with no models folder: the embedded default model, base then its refiner, as the CLI runs it."""
    webuiapi = pytest.importorskip("webuiapi")
    with live_server(tmp_path / "served") as live:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=live.config.port)
        (title,) = api.util_get_model_names()
        assert title.startswith("default [") and api.util_get_current_model() == title
        api.util_set_model(title)
        r = api.txt2img(prompt="a red circle on a blue background", seed=1, steps=4, cfg_scale=5, width=128,
                        height=128, sampler_name="Euler")
        body = {"prompt": "a red circle on a blue background", "seed": 1, "steps": 4, "cfg_scale": 5, "width": 128,
                "height": 128, "sampler_name": "Euler", "refiner_checkpoint": "None"}
        off = api.custom_post("txt2img", body, baseurl=True)
    out = tmp_path / "cli.png"
    assert main(["generate", "a red circle on a blue background", "--seed", "1", "--steps", "4", "--dtype", "fp32",
                 "--device", "cpu", "-q", "-o", str(out)]) == 0, capsys.readouterr().err
    cli = Image.open(out)
    assert _same(r.image, cli) and r.image.info["parameters"] == cli.info["parameters"]
    assert "Refiner: default_refiner" in r.info["infotexts"][0]
    assert main(["generate", "a red circle on a blue background", "--seed", "1", "--steps", "4", "--no-refiner",
                 "--dtype", "fp32", "--device", "cpu", "-q", "-o", str(out)]) == 0, capsys.readouterr().err
    assert "Refiner" not in off.info["infotexts"][0]
    assert _same(off.image, Image.open(tmp_path / "cli-1.png"))
