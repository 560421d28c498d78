"""The web page (issue 12) end to end in headless Chromium: Debian's `chromium` driven by Playwright's Python package
(never `playwright install`), against a live `sdxl serve` with a tiny model (tests/serve_fixtures.py)."""

from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import pytest
from PIL import Image, PngImagePlugin
from serve_fixtures import live_server, served, tiny_models  # noqa: F401  (pytest fixtures)

from sdxl.models.model import BUCKETS
from sdxl.session import SDXL_NATIVE

CHROMIUM = shutil.which("chromium")
TIMEOUT_MS = 180_000  # the first job loads the pipeline
# An A1111 infotext with the fields the form takes (sampler in the v1.9+ form with a schedule type, hires fix).
INFOTEXT = ("a purple diamond on the left\nNegative prompt: blurry, text\n"
            "Steps: 13, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 12345, Size: 96x64, "
            "Model: tiny, Refiner: tiny_refiner, Refiner switch at: 0.6, Hires upscale: 2, Hires steps: 3, "
            'Hires upscaler: Latent, Denoising strength: 0.4, Crop: "0,0", Batch size: 2')


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def open_page(browser, url: str, **context):
    """A fresh page at `url` once its form is built; JavaScript errors collected in page.errors."""
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900}, **context)
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    return page


@pytest.fixture
def page(browser, served):
    page = open_page(browser, served.url)
    yield page
    page.context.close()
    assert page.errors == []


def test_the_page_and_its_files_are_served_with_a_strict_policy(served):
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="static/app.js"' in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        assert httpx.get(f"{served.url}/static/{name}").headers["content-type"].startswith(kind)
    for name in ("page.py", "..%2Fpage.py", "%2E%2E%2Fpage.py", "nope.js"):
        assert httpx.get(f"{served.url}/static/{name}").status_code == 404
    config = httpx.get(served.url + "/page/config").json()
    assert config["buckets"] == [list(b) for b in BUCKETS] and [1152, 896] in config["buckets"]
    assert config["samplers"]["euler_ancestral"] == "Euler a" and config["schedules"]["karras"] == "Karras"
    assert config["native"] == SDXL_NATIVE | {"sampler": "euler"}  # the tiny model records none: SDXL's
    bad = httpx.get(served.url + "/page/config", params={"model": "../secret"})
    assert bad.status_code == 422 and "not a path" in bad.json()["detail"]


def fast_form(page, prompt: str, seed: int) -> None:
    page.fill("#prompt", prompt)
    for field, value in (("#width", 64), ("#height", 64), ("#steps", 2), ("#seed", seed)):
        page.fill(field, str(value))


def finished_result(page):
    """The first result image once it has loaded (not the preview), as its <img> element."""
    page.wait_for_function("() => { const i = document.querySelector('#result img');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=TIMEOUT_MS)
    return page.query_selector("#result img")


def test_generate_shows_the_image_and_its_png_carries_the_infotext(page, tmp_path):
    fast_form(page, "a red circle on a blue background", 7)
    page.select_option("#lora", "style.safetensors")
    page.click("#lora-add")
    assert page.input_value("#prompt") == "a red circle on a blue background <lora:style:0.8>"
    page.click("#generate")
    img = finished_result(page)
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    assert page.is_visible("#error") is False
    with page.expect_download() as download:
        page.click("#result a.download")
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert path.name == "sdxl-7.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        text = im.info["parameters"]
    assert text.startswith("a red circle on a blue background")
    assert "Steps: 2," in text and "Seed: 7," in text and "Size: 64x64" in text
    # the gallery keeps it with its parameters; "Reuse last" brings its seed back
    assert page.locator("#gallery figure").count() == 1
    assert "Seed: 7" in page.get_attribute("#gallery figure", "title")
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "7"
    # "Use settings" puts the image's parameters back into the form
    page.fill("#prompt", "something else")
    page.fill("#steps", "30")
    page.click("#result button:has-text('Use settings')")
    assert (page.input_value("#prompt"), page.input_value("#steps")) == (  # its LoRA tag kept, as in A1111
        "a red circle on a blue background <lora:style:0.8>", "2")


def test_a_refused_request_shows_the_servers_reason(page):
    fast_form(page, "a red circle on a blue background", 1)
    page.fill("#width", "100")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "width and height must be positive multiples of 8, got 100x64"
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")


def test_batch_size_and_count(page):
    fast_form(page, "two blue circles on a white background", 20)
    page.fill("#batch", "2")
    page.fill("#n_iter", "2")
    page.click("#generate")
    finished_result(page)
    page.wait_for_function("() => document.querySelectorAll('#result img').length === 4")
    seeds = [t.split("Seed: ")[1].split(",")[0] for t in page.locator("#result .infotext").all_inner_texts()]
    assert seeds == ["20", "21", "22", "23"] and page.locator("#gallery figure").count() == 4


def test_refiner_and_hires_fix(page):
    fast_form(page, "a green triangle on a white background", 5)
    page.click("#refiner-box summary")
    page.check("#refiner-on")
    page.select_option("#refiner", "tiny_refiner.safetensors")
    page.fill("#refiner_switch", "0.5")
    page.click("#hires-box summary")
    page.check("#hires-on")
    page.fill("#hires_steps", "1")
    page.click("#generate")
    img = finished_result(page)
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [128, 128]  # 64 x 2
    text = page.inner_text("#result .infotext")
    assert "Refiner: tiny_refiner, Refiner switch at: 0.5" in text
    assert "Hires upscale: 2.0, Hires upscaler: Latent, Hires steps: 1" in text


def png_with_text(text: str, zip_: bool) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text, zip=zip_)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def drop_file(page, data: bytes, name: str, target: str = "main") -> None:
    """Drop a file onto the page as a user would drag one from the desktop."""
    transfer = page.evaluate_handle("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "image/png" }));
        return dt; }""", [base64.b64encode(data).decode(), name])
    page.dispatch_event(target, "drop", {"dataTransfer": transfer})


@pytest.mark.parametrize("prompt, zip_", [
    ("a purple diamond on the left", False),  # tEXt
    ("a purple diamond on the left", True),  # zTXt (deflated)
    ("a purple diamond on the left, café ☕", False),  # iTXt (UTF-8)
    ("a purple diamond on the left, café ☕", True),  # iTXt, deflated
])
def test_dropping_a_png_fills_the_form_from_its_infotext(page, prompt, zip_):
    drop_file(page, png_with_text(INFOTEXT.replace("a purple diamond on the left", prompt), zip_), "old.png")
    page.wait_for_function("() => document.querySelector('#prompt').value !== ''")
    values = {f: page.input_value(f"#{f}") for f in (
        "prompt", "negative_prompt", "steps", "sampler", "schedule", "cfg", "seed", "width", "height", "batch",
        "hires_scale", "hires_steps", "hires_strength", "hires_upscale")}
    assert values == {"prompt": prompt, "negative_prompt": "blurry, text", "steps": "13", "sampler": "dpmpp_2m",
                      "schedule": "karras", "cfg": "6.5", "seed": "12345", "width": "96", "height": "64",
                      "batch": "2", "hires_scale": "2", "hires_steps": "3", "hires_strength": "0.4",
                      "hires_upscale": "latent"}
    assert page.is_checked("#hires-on")
    assert page.input_value("#model") == "tiny.safetensors"
    assert page.is_checked("#refiner-on") and page.input_value("#refiner") == "tiny_refiner.safetensors"
    assert page.input_value("#refiner_switch") == "0.6"
    assert page.is_visible("#error") is False


def test_dropping_the_old_sampler_form_and_a_png_without_parameters(page):
    old = INFOTEXT.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: Euler a Karras")
    drop_file(page, png_with_text(old, False), "old.png")
    page.wait_for_function("() => document.querySelector('#prompt').value !== ''")
    assert (page.input_value("#sampler"), page.input_value("#schedule")) == ("euler_ancestral", "karras")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    drop_file(page, buf.getvalue(), "plain.png")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "plain.png: carries no generation parameters (only PNGs with A1111 infotext do)"
    damaged = bytearray(png_with_text(INFOTEXT, True))
    at = damaged.index(b"zTXtparameters") + len(b"zTXtparameters") + 2  # after the keyword, 0 and the method
    damaged[at:at + 12] = b"\xff" * 12
    drop_file(page, bytes(damaged), "damaged.png")
    page.wait_for_function("() => document.querySelector('#error').textContent.startsWith('damaged.png')")
    assert page.inner_text("#error") == "damaged.png: its text chunks cannot be read (a damaged PNG)"


def test_dropping_onto_img2img_makes_it_the_init_image(page):
    drop_file(page, png_with_text(INFOTEXT, False), "start.png", "#img2img-box")
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.is_checked("#img2img-on") and page.input_value("#prompt") == ""
    assert page.eval_on_selector("#init-canvas", "c => [c.width, c.height]") == [8, 8]


def test_inpainting_sends_the_image_and_the_painted_mask(page, tmp_path):
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "init.png")
    page.click("#img2img-box summary")
    page.set_input_files("#init-file", str(tmp_path / "init.png"))
    page.wait_for_selector("#mask-canvas", state="visible")
    # the output keeps the image's aspect at the current size's longer side
    assert (page.input_value("#width"), page.input_value("#height")) == ("1024", "680")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    page.eval_on_selector("#brush", "e => { e.value = 16; }")
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    fast_form(page, "a white circle on a red background", 3)
    with page.expect_request("**/v1/jobs") as request:
        page.click("#generate")
    body = json.loads(request.value.post_data)
    assert body["strength"] == 0.75 and body["init_image"].startswith("data:image/png;base64,")
    init = Image.open(io.BytesIO(base64.b64decode(body["init_image"].partition(",")[2])))
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].partition(",")[2]))).convert("L")
    assert init.size == mask.size == (96, 64)
    assert [level for level, n in enumerate(mask.histogram()) if n] == [0, 255]
    assert mask.getpixel((72, 32)) == 255 and mask.getpixel((10, 32)) == 0 and mask.getpixel((72, 5)) == 0
    finished_result(page)
    assert "Denoising strength: 0.75" in page.inner_text("#result .infotext")


def test_cancel_stops_the_running_job(page):
    fast_form(page, "three green stars on a black background", 1)
    page.fill("#steps", "500")
    page.click("#generate")
    page.wait_for_function("() => /step [1-9]/.test(document.querySelector('#progress-text').textContent)",
                           timeout=TIMEOUT_MS)
    page.wait_for_selector("#preview:not([hidden])", timeout=TIMEOUT_MS)  # the live preview of the latent
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    page.reload()  # the page follows its running job again
    page.wait_for_function("() => /step [1-9]/.test(document.querySelector('#progress-text').textContent)",
                           timeout=TIMEOUT_MS)
    page.click("#cancel")
    page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_MS)
    assert page.inner_text("#error") == "cancelled"
    assert page.is_enabled("#generate") and page.locator("#result img").count() == 0


def test_the_page_sends_the_basic_auth_the_browser_holds(browser, tiny_models, tmp_path):
    with live_server(tmp_path, tiny_models, api_auth="ann:secret") as live:
        page = open_page(browser, live.url, http_credentials={"username": "ann", "password": "secret"})
        assert page.input_value("#model") == "tiny.safetensors"
        assert page.input_value("#steps") == "40" and page.input_value("#width") == "1024"  # SDXL's native
        assert page.errors == []
        page.context.close()
        assert httpx.get(live.url + "/").status_code == 401


def test_the_default_models_refiner_can_be_turned_off(browser, tmp_path):
    """The default model's built-in refiner: ticked and enabled; unticked, the job runs without it."""
    with live_server(tmp_path) as live:
        page = open_page(browser, live.url)
        page.click("#refiner-box summary")
        assert page.is_checked("#refiner-on") and page.is_enabled("#refiner-on")
        assert page.is_visible("#refiner-builtin") and not page.is_visible("#refiner")
        fast_form(page, "a red circle on a blue background", 3)
        page.uncheck("#refiner-on")
        page.click("#generate")
        finished_result(page)
        assert "Refiner" not in page.inner_text("#result .infotext")
        page.check("#refiner-on")
        page.click("#generate")
        page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 2",
                               timeout=TIMEOUT_MS)
        page.wait_for_function("() => /Refiner: default_refiner/.test("
                               "document.querySelector('#result .infotext').textContent)", timeout=TIMEOUT_MS)
        assert page.errors == []
        page.context.close()
