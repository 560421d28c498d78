"""The AUTOMATIC1111 API and OpenAI's images/generations (sdxl.serve.a1111): the pure mapping of request bodies
to job settings, then the real `webuiapi` client against a live server on 127.0.0.1 with the default model."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

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
    ({"enable_hr": True}, {"hires_scale": 2.0, "hires_upscale": "latent"}),
    ({"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)", "hr_second_pass_steps": 5,
      "denoising_strength": 0.4}, {"hires_scale": 1.5, "hires_upscale": "latent", "hires_steps": 5,
                                   "hires_strength": 0.4}),
    ({"enable_hr": True, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 0},
     {"hires_scale": 2.0, "hires_upscale": "pixel"}),
    ({"enable_hr": True, "width": 128, "height": 96, "hr_resize_x": 192},
     {"hires_scale": 1.5, "hires_upscale": "latent", "width": 128, "height": 96}),
    ({"enable_hr": True, "width": 128, "height": 96, "hr_resize_x": 256, "hr_resize_y": 192},
     {"hires_scale": 2.0, "hires_upscale": "latent", "width": 128, "height": 96}),
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


def test_models_and_refiner():
    p = a1111.checked_fields({"override_settings": {"sd_model_checkpoint": "base.safetensors [0123456789]",
                                                    "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 2},
                              "refiner_checkpoint": "refiner.safetensors", "refiner_switch_at": 0.7})
    assert a1111.model_choice(p) == {"model": "base.safetensors [0123456789]", "refiner": "refiner.safetensors"}
    assert a1111.request_settings(p, "txt2img")["refiner_switch"] == 0.7
    p = a1111.checked_fields({"override_settings": {"sd_vae": "my.vae.safetensors"}, "refiner_checkpoint": ""})
    assert a1111.model_choice(p) == {"vae": "my.vae.safetensors"}
    assert "refiner_switch" not in a1111.request_settings(p, "txt2img")
    with pytest.raises(FieldError) as e:
        a1111.model_choice({"override_settings": {"sd_model_checkpoint": 3}})
    assert e.value.field == "override_settings.sd_model_checkpoint"


@pytest.mark.parametrize("payload, field", [
    ({"restore_faces": True}, "restore_faces"), ({"tiling": True}, "tiling"),
    ({"subseed_strength": 0.5}, "subseed_strength"), ({"script_name": "x/y/z plot"}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
    ({"seed_resize_from_w": 512}, "seed_resize_from_w"),
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
    assert 0 < m[16, 32] < 255  # blurred edge
    # fill: inside the (inverted) mask's kept square the pixels are the original; the border got blurred colours
    assert np.array_equal(init[24:40, 24:40], np.asarray(image)[24:40, 24:40])
    assert not np.array_equal(init[:4], np.asarray(image)[:4])


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
    ({"init_images": []}, "init_images"), ({"mask_blur": -1}, "mask_blur"),
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
