"""The faults a tester found in LoRAs, --unet, prediction types and presets (reports/tester-b.md), each with the
value it must give."""

import inspect
import os
import shutil

import pytest
import torch
from conftest import FAST, run
from serve_fixtures import FAST as SERVE_FAST
from serve_fixtures import live_server, make_models_folder
from test_lora import fresh
from test_lora_prompts import lora_file

from sdxl.adapters.apply import use_adapters
from sdxl.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The models folder with loras/a.safetensors besides style.safetensors."""
    root = make_models_folder(tmp_path_factory.mktemp("models"))
    lora_file(root / "loras" / "a.safetensors", 3)
    return root


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# 1: a LoRA file rewritten between two requests is read again
def test_a_rewritten_lora_is_read_again(folder, tmp_path):
    path = tmp_path / "swap.safetensors"
    shutil.copy(folder / "loras" / "style.safetensors", path)
    model, expected = fresh(), fresh()
    use_adapters(model, [(path, 1.0, 1.0)])
    shutil.copy(folder / "loras" / "a.safetensors", path)  # another LoRA under the same name
    os.utime(path, ns=(1, 1))  # even with an older mtime: the size/inode tell it changed
    assert use_adapters(model, [(path, 1.0, 1.0)]) != []
    use_adapters(expected, [(folder / "loras" / "a.safetensors", 1.0, 1.0)])
    got, want = weights(model), weights(expected)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert use_adapters(model, [(path, 1.0, 1.0)]) == []  # unchanged: nothing read


# 2: a broken LoRA file is the client's 422 at submit, and not listed as usable
BROKEN = {"empty": b"", "trunc": b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":", "garbage": b"not a safetensors file" * 9}


def test_a_broken_lora_is_a_422_at_submit_and_not_listed(folder, tmp_path):
    for name, data in BROKEN.items():
        (folder / "loras" / f"{name}.safetensors").write_bytes(data)
    vae = folder / "loras" / "avae.safetensors"
    from safetensors.torch import save_file
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, vae)
    with live_server(tmp_path / "out", folder) as live:
        base = SERVE_FAST | {"seed": 1, "refiner_checkpoint": "None"}
        for name in [*BROKEN, "avae"]:
            r = live.http.post("/sdapi/v1/txt2img", json=base | {"prompt": f"a cat <lora:{name}:1>"})
            assert r.status_code == 422, (name, r.text)
            assert f"lora '{name}'" in r.text
            r = live.http.post("/v1/jobs", json={"prompt": "a cat", "loras": [[name, 1.0]], **SERVE_FAST})
            assert r.status_code == 422, (name, r.text)
        listed = {d["name"] for d in live.http.get("/sdapi/v1/loras").json()}
        assert listed == {"a", "style"}
        r = live.http.post("/sdapi/v1/txt2img", json=base | {"prompt": "a cat <lora:nosuch:1>"})
        assert r.status_code == 422 and "choose one of: a, style" in r.text
    for name in [*BROKEN, "avae"]:
        (folder / "loras" / f"{name}.safetensors").unlink()


# 12: grammar of the messages
def test_one_stray_tensor_is_singular(folder, tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(folder / "loras" / "style.safetensors") | {"stray": torch.zeros(1)}
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="1 tensor whose name matches no adapter weights "):
        use_adapters(fresh(), [(tmp_path / "x.safetensors", 1.0, 1.0)])


# 3: --prediction / --zero-terminal-snr describe the base, never the refiner
def test_prediction_flags_do_not_reach_the_refiner(monkeypatch):
    import sdxl.pipeline as pipeline
    from conftest import randomize

    from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel
    from sdxl.request import Request

    base, refiner = randomize(SDXLModel(TINY_BASE), 0, 0.05), randomize(SDXLModel(TINY_REFINER), 1, 0.05)
    seen, real = [], pipeline.GuidedDenoiser

    def spy(*args, **kw):
        bound = inspect.signature(real).bind(*args, **kw).arguments
        seen.append((bound["prediction"], float(bound["sigmas_train"][-1])))  # the base's stage, then the refiner's
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "GuidedDenoiser", spy)
    req = Request("a cat", width=64, height=64, steps=4, seed=1, prediction="v", zero_terminal_snr=True,
                  refiner_switch=0.5)
    pipeline.Pipeline(base, refiner, dtype=torch.float32, channels_last=False).generate(req)
    assert seen[0] == ("v", pytest.approx(4096.0, rel=1e-6))
    assert seen[1] == ("epsilon", pytest.approx(14.6146, rel=1e-4))  # SDXL's own last training sigma


@pytest.fixture(scope="module")
def unet_v(tmp_path_factory):
    """A tiny base file and a UNet-only file (official names) with kohya's v_pred and ztsnr marker keys."""
    from conftest import randomize

    from sdxl.formats import checkpoint as ck
    from sdxl.formats.files import write_tensors
    from sdxl.models.model import TINY_BASE, SDXLModel

    d = tmp_path_factory.mktemp("unet")
    base = ck.save_single_file(randomize(SDXLModel(TINY_BASE), 0, 0.05), d / "base.safetensors")
    sd = {"model.diffusion_model." + k: v for k, v in randomize(SDXLModel(TINY_BASE), 5, 0.05).unet.state_dict().items()}
    marks = {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}
    return base, write_tensors(d / "vunet.safetensors", sd | marks, None, mode="new")


# 4: the infotext records the --unet file and the prediction its keys say
def test_infotext_records_the_unet_and_its_prediction(unet_v, tmp_path, capsys):
    from PIL import Image

    from sdxl.formats.png import file_hash

    base, unet = unet_v
    out = tmp_path / "u.png"
    assert run(capsys, "generate", "a cat", "--model", base, "--unet", unet, "--seed", 2, "-o", out, *FAST)[0] == 0
    text = Image.open(out).info["parameters"]
    assert "Prediction: v" in text and "Zero terminal SNR: True" in text
    assert f"UNet: vunet, UNet hash: {file_hash(unet)[:10]}" in text


# 5: an empty file flag is refused, not read as unset
@pytest.mark.parametrize("flag", ["--unet", "--model", "--vae"])
def test_an_empty_file_flag_is_refused(flag, capsys):
    code, _, err = run(capsys, "generate", "a cat", flag, "", *FAST)
    assert code == 2 and f"{flag} '': no file given" in err


# 9: NaN weights are the file's fault, named as such (not "retry with --dtype fp32")
def test_nan_weights_name_the_file(unet_v, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from sdxl.errors import SDXLError
    from sdxl.models.model import TINY_BASE, SDXLModel
    from sdxl.pipeline import Pipeline
    from sdxl.request import Request

    base, unet = unet_v
    sd = load_file(unet)
    key = sorted(k for k in sd if k.endswith(".weight"))[3]
    save_file(sd | {key: torch.full_like(sd[key], float("nan"))}, tmp_path / "nan.safetensors")
    code, _, err = run(capsys, "generate", "a cat", "--model", base, "--unet", tmp_path / "nan.safetensors",
                       *FAST[:-1], "bf16")
    assert code == 2 and f"nan.safetensors: 1 tensor holding NaN/Inf ({key})" in err and "--dtype" not in err
    model = SDXLModel(TINY_BASE)
    with torch.no_grad():
        model.unet.out[2].weight.fill_(float("nan"))
    with pytest.raises(SDXLError, match=r"the UNet's weight out\.2\.weight holds NaN/Inf; the checkpoint"):
        Pipeline(model, dtype=torch.bfloat16, channels_last=False).generate(Request("a", width=64, height=64, steps=2))


# 6: zero terminal SNR on an epsilon model: a warning (printed once: Python's default filter), not otherwise
def test_zero_terminal_snr_on_an_epsilon_model_warns(unet_v, tmp_path, capsys):
    import warnings

    def said(*flags) -> set[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            code, _, err = run(capsys, "generate", "a cat", "--model", unet_v[0], *flags, "-o",
                               tmp_path / f"{len(flags)}.png", *FAST)
        assert code == 0, err
        return {str(w.message) for w in seen if "zero terminal SNR" in str(w.message)}

    assert said("--zero-terminal-snr") == {
        "zero terminal SNR with an epsilon-prediction UNet gives noise: it needs v-prediction (Lin et al. 2024); use "
        "--prediction v for a v-prediction model, else --no-zero-terminal-snr"}
    assert said() == set() and said("--unet", unet_v[1], "--zero-terminal-snr") == set()


# 10: a replay after the LoRA folder moved says so; a relative --unet is recorded absolute
def test_replay_after_the_lora_folder_moved_and_a_relative_unet(folder, unet_v, tmp_path, capsys, monkeypatch):
    import json

    from PIL import Image

    loras = tmp_path / "l"
    shutil.copytree(folder / "loras", loras)
    monkeypatch.chdir(unet_v[1].parent)
    out = tmp_path / "t.png"
    assert run(capsys, "generate", "a cat <lora:a:0.5>", "--model", unet_v[0], "--unet", unet_v[1].name,
               "--lora-dir", loras, "--seed", 1, "-o", out, *FAST)[0] == 0
    assert json.loads(Image.open(out).info["sdxl-recipe"])["models"]["unet"] == str(unet_v[1])
    loras.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "generate", "--from-png", out, "-o", tmp_path / "r.png", "--no-watermark", "-q")
    assert code == 2 and f"the LoRA folder {loras} is gone (moved or deleted); give --lora-dir DIR" in err
    assert run(capsys, "generate", "--from-png", out, "--lora-dir", tmp_path / "moved", "-o", tmp_path / "r.png",
               "--no-watermark", "-q")[0] == 0
    assert Image.open(tmp_path / "r.png").tobytes() == Image.open(out).tobytes()


# 7: a --lora file with ':' in its name is written as a tag that pastes back
def test_a_lora_file_with_a_colon_pastes_back(folder, unet_v, tmp_path, capsys):
    from PIL import Image

    from sdxl.formats.png import lora_hash

    d = tmp_path / "l"
    d.mkdir()
    weird = shutil.copy(folder / "loras" / "a.safetensors", d / "we:ird.safetensors")
    out, again = tmp_path / "w.png", tmp_path / "again.png"
    assert run(capsys, "generate", "a cat", "--model", unet_v[0], "--lora", weird, "--seed", 1, "-o", out, *FAST)[0] == 0
    text = Image.open(out).info["parameters"]
    assert text.startswith("a cat <lora:weird:1.0>\n") and f'Lora hashes: "weird: {lora_hash(weird)}"' in text
    assert run(capsys, "generate", text.split("\n")[0], "--model", unet_v[0], "--lora-dir", d, "--seed", 1,
               "-o", again, *FAST)[0] == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()


# 11: a preset's size: replaced as a whole by a given side; only on an SDXL-size model
def test_preset_size_is_replaced_whole_and_kept_off_small_models(unet_v):
    from sdxl.cli import _settings, build_parser
    from sdxl.session import build_request, resolve_models

    def size(*argv) -> tuple[int, int]:
        args = build_parser().parse_args(["generate", "a cat", "--preset", "turbo", "--no-refiner", *argv])
        models = resolve_models(args.model, None, True)
        req = build_request(_settings(args, None, models, None) | {"prompt": args.prompt}, models, "test")
        return req.width, req.height

    base = str(unet_v[0])  # no native size recorded: SDXL's 1024
    assert size("--model", base) == (512, 512)
    assert size("--model", base, "--width", "128") == (128, 1024)
    assert size("--model", base, "--height", "64") == (1024, 64)
    native = resolve_models(None, None, True).native["resolution"]
    assert native < 1024 and size() == (native, native)  # the small default model keeps its own size


# 8: tag-like text the encoders read as words: one warning
def test_stray_tags_warn_once(unet_v, folder):
    import warnings

    from sdxl.session import build_request, resolve_models

    models = resolve_models(str(unet_v[0]), None, True, lora_dir=folder / "loras")

    def said(**settings) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            build_request({"width": 64, "height": 64} | settings, models, "test")
        return [str(w.message) for w in seen]

    assert said(prompt="a cat <lora:style:1>") == []
    assert said(prompt="a <LORA:style:1> <hypernet:foo:1> <lora:> <lora:style:1", negative_prompt="<lora:nosuch:1>") == [
        "<LORA:style:1>, <hypernet:foo:1>, <lora:>, ...: not a LoRA tag, read as words; LoRA tags are <lora:NAME:W> "
        "(lower case, closed) in the prompt only"]
    assert said(prompt="a cat", negative_prompt="<lora:style:1>") == [
        "<lora:style:1>: not a LoRA tag, read as words; LoRA tags are <lora:NAME:W> (lower case, closed) in the prompt "
        "only"]


# 12: a weight of -0 is logged as 0
def test_minus_zero_weight_is_zero(folder, unet_v, tmp_path, capsys):
    code, out, err = run(capsys, "generate", "a cat <lora:style:-0>", "--model", unet_v[0], "--lora-dir",
                         folder / "loras", "-o", tmp_path / "z.png", *[f for f in FAST if f != "-q"])
    assert code == 0, err
    assert "weight 0.0" in out + err and "weight -0" not in out + err  # (a tmp path may hold "-0")
