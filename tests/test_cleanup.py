"""Loose ends of issues 10 and 11: models built by constructors, file I/O through `sdxl.formats.files`,
precomputed embeddings, the inpainting mask blur. Tiny random models, fp32, CPU."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image

from sdxl.errors import SDXLError
from sdxl.formats import checkpoint as ck
from sdxl.models.conditioning import Conditioner, conditioner_config
from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel
from sdxl.models.vae import TINY_VAE, AutoencoderKL
from sdxl.pipeline import Pipeline
from sdxl.request import Request

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return randomize(SDXLModel(TINY_BASE), 0, 0.05)


@pytest.fixture(scope="module")
def pipe(base):
    return Pipeline(base, dtype=torch.float32, channels_last=False)


# --- models put together by constructors ----------------------------------------------------------

def test_load_with_a_standalone_vae_of_another_shape(base, tmp_path):
    """--vae with a VAE of another shape: the model's config is the VAE's, its weights the file's, in eval mode."""
    ck.save_single_file(base, tmp_path / "base.safetensors")
    torch.manual_seed(1)
    other = randomize(AutoencoderKL(dataclasses.replace(TINY_VAE, ch_mult=(1, 1))), 1)
    ck.write_tensors(tmp_path / "vae.safetensors", other.state_dict())
    model = ck.load(tmp_path / "base.safetensors", vae_path=tmp_path / "vae.safetensors")
    assert model.cfg == dataclasses.replace(base.cfg, vae=other.cfg)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.vae.state_dict().items())
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in model.unet.state_dict().items())
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_conditioner_from_parts_shares_the_encoder(base):
    bigg = base.conditioner.bigg
    cfg = conditioner_config(None, bigg.cfg, TINY_REFINER.unet.adm_in_channels)
    c = Conditioner.from_parts(cfg, bigg)
    assert c.cfg == cfg == TINY_REFINER.conditioner and c.bigg is bigg and c.clip_l is None
    assert list(c.state_dict()) == list(SDXLModel(TINY_REFINER).conditioner.state_dict())
    with pytest.raises(ValueError, match="do not match"):
        Conditioner.from_parts(TINY_BASE.conditioner, bigg)  # the base's config wants a CLIP-L too
    full = Conditioner.from_parts(TINY_BASE.conditioner, bigg, base.conditioner.clip_l)
    assert full.clip_l is base.conditioner.clip_l and full.embedders[1] is bigg


def test_write_samples_leaves_training_state_alone(tmp_path):
    """Sample images mid-run: the trained parameters still require gradients and the model stays in training mode."""
    from sdxl.models.tokenizer import Tokenizer
    from sdxl.train import config, loop

    cfg = config.build(dict(dataset="synthetic:4", resolution=32, bucket_step=16, batch_size=2, steps=2,
                            sample_prompts=("a red circle",), sample_steps=1, unet={"model_channels": 32},
                            clip_l={"layers": 2}, bigg={"layers": 2}))
    d = loop.Dist()
    model = loop.build_model(cfg, d.device)
    run = loop.Run(cfg, model, loop.trainable_parameters(model, cfg, d), d)
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(grads.values())
    loop.write_samples(run, Tokenizer.default(), tmp_path, 1)
    assert (tmp_path / "samples" / "step-000001-0.png").is_file()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(m.training for m in model.modules())


# --- file I/O through sdxl.formats.files ------------------------------------------------------------

def test_a_pickled_optimizer_file_is_refused_in_one_line(tmp_path):
    """checkpointing.load reads through SafetensorsFile: a pickle is refused unread, a corrupt file named."""
    import pickle

    from sdxl.errors import CheckpointError
    from sdxl.train import checkpointing

    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "optimizer.safetensors").write_bytes(pickle.dumps({"state": {}}, protocol=4))
    with pytest.raises(CheckpointError) as e:
        checkpointing.load(tmp_path, 0)
    assert str(e.value).startswith(f"{tmp_path / 'optimizer.safetensors'}: is a Python pickle")
    (tmp_path / "optimizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError) as e:
        checkpointing.load(tmp_path, 0)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'optimizer.safetensors'}: corrupt safetensors header")
    assert "\n" not in message and "re-download" not in message


def test_latest_pointer_is_written_through_write_file(tmp_path, monkeypatch):
    """The `latest` pointer is replaced atomically by files.write_file, naming the new folder."""
    from sdxl.formats import files
    from sdxl.train import checkpointing

    written = []
    real = files.write_file
    monkeypatch.setattr(files, "write_file", lambda path, *a, **k: written.append(path) or real(path, *a, **k))
    for step in (1, 2):
        checkpointing.save(tmp_path, step, {"w": torch.ones(2)}, {"state": {}, "param_groups": []}, None,
                           {"step": step}, keep=2)
    assert (tmp_path / "latest").read_text() == "step-000002\n"
    assert written.count(tmp_path / "latest") == 2
    assert torch.equal(checkpointing.load(tmp_path / "step-000002", 0)["trained"]["w"], torch.ones(2))


def test_a_corrupt_cache_file_is_skipped_and_named(tmp_path):
    """A damaged latent cache file: that image is skipped, and the reason names the cache file and the fix."""
    from sdxl.formats.files import write_tensors
    from sdxl.train import data

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    good = tmp_path / "good.safetensors"
    write_tensors(good, {"mean": torch.zeros(4, 16, 16), "std": torch.ones(4, 16, 16)},
                  {"crop_coords_top_left": "[0, 0]"})
    text = tmp_path / "text.safetensors"
    write_tensors(text, {"crossattn": torch.zeros(77, 8), "pooled": torch.zeros(8)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-3])
    items = [data.Item(str(image), "a", (32, 32)), data.Item(str(image), "b", (32, 32))]
    ds = data.CachedDataset(items, [(32, 32)], [0, 0], 0, False, 6.0, [bad, good], [text, text])
    sample = ds[(0, 0, 0)]
    assert sample["caption"] == "b" and torch.equal(sample["std"], torch.ones(4, 16, 16))
    assert sample["failed"] == [f"{bad}: truncated: the header describes 8192 bytes of tensor data but the file "
                                "holds 8189; delete it: it is rebuilt"]


def test_recipe_unet_only_writes_the_unet_in_fp16(base, tmp_path):
    from sdxl.formats.files import SafetensorsFile
    from sdxl.lab import recipe

    ck.save_single_file(base, tmp_path / "full.safetensors")
    (tmp_path / "unet.safetensors").write_bytes(b"an older export")
    recipe.unet_only(tmp_path / "full.safetensors", tmp_path / "unet.safetensors", {"sdxl.lab.recipe": "test"})
    f = SafetensorsFile(tmp_path / "unet.safetensors")
    want = {"model.diffusion_model." + k: v for k, v in base.unet.state_dict().items()}
    assert f.metadata == {"sdxl.lab.recipe": "test"} and set(f) == set(want)
    assert all(f[k].dtype == torch.float16 and torch.equal(f[k], v.half()) for k, v in want.items())


# --- precomputed embeddings ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_refiner(base):
    torch.manual_seed(1)
    refiner = randomize(SDXLModel(TINY_REFINER), 1, 0.05)
    return Pipeline(base, refiner, dtype=torch.float32, channels_last=False)


@pytest.mark.parametrize("kw", [dict(batch=2, prompt=("a red circle", "a blue square")),
                                dict(cfg=1.0),
                                dict(refiner_switch=0.6, hires_scale=1.5, hires_steps=2)])
def test_precomputed_embeddings_give_the_same_latents(with_refiner, monkeypatch, kw):
    """Encode once, pass the (cond, uncond) pairs: the same latents bit for bit, and no prompt is encoded."""
    pipe = with_refiner
    req = Request(**{"prompt": "a red circle", "negative_prompt": "blurry", "width": SIZE, "height": SIZE,
                     "steps": 3, "seed": 4, **kw})
    want = pipe.generate(req).latents
    embeddings = {"base": pipe.conditioning(pipe.base, req), "refiner": pipe.conditioning(pipe.refiner, req)}

    def encode(*args):
        raise AssertionError("the prompt was encoded")

    monkeypatch.setattr(pipe, "conditioning", encode)
    assert torch.equal(pipe.generate(req, embeddings=embeddings).latents, want)


def test_embeddings_of_the_base_only_encode_the_refiners_prompt(with_refiner):
    req = Request("a lighthouse", width=SIZE, height=SIZE, steps=4, seed=2, refiner_switch=0.5)
    embeddings = {"base": with_refiner.conditioning(with_refiner.base, req)}
    assert torch.equal(with_refiner.generate(req, embeddings=embeddings).latents, with_refiner.generate(req).latents)


@pytest.mark.parametrize("change,message", [
    (lambda e, r: {"hires": e["base"]}, "embeddings: 'hires' is not a model of this pipeline; give 'base'"),
    (lambda e, r: {"base": e["base"][0]}, "embeddings['base']: expected the (cond, uncond) pair"),
    (lambda e, r: {"base": (e["base"][0][:1], e["base"][1][:1])},
     "embeddings['base']: cond crossattn and vector are ((1, 77, 256), (1, 1632)), expected ((2, 77, 256), (2, 1632))"),
    (lambda e, r: {"base": (e["base"][0], None)}, "embeddings['base']: uncond crossattn and vector are None"),
    (lambda e, r: {"base": e["refiner"]}, "embeddings['base']: cond crossattn and vector are ((2, 77, 128), (2, 1376))"),
])
def test_embeddings_that_do_not_fit_are_one_line(with_refiner, change, message):
    base_only = Pipeline(with_refiner.base, dtype=torch.float32, channels_last=False)
    req = Request("a tree", width=SIZE, height=SIZE, steps=2, seed=0, batch=2)
    embeddings = {"base": base_only.conditioning(base_only.base, req),
                  "refiner": with_refiner.conditioning(with_refiner.refiner, req)}
    with pytest.raises(SDXLError) as e:
        base_only.generate(req, embeddings=change(embeddings, req))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# --- mask blur -------------------------------------------------------------------------------------

def picture(seed=0) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def inpaint(pipe, blur: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(result, original, repaint mask) of inpainting a 16x16 square at (24, 24) of a 64x64 picture."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (24, 24, 40, 40))
    req = Request("a tree", width=SIZE, height=SIZE, steps=2, seed=5, init_image=picture(1), mask=mask, strength=0.9,
                  mask_blur=blur)
    return np.asarray(pipe.generate(req).images[0]), np.asarray(picture(1)), np.asarray(mask) > 0


def distance_outside(mask: np.ndarray) -> np.ndarray:
    """Chebyshev distance in pixels from the mask (0 inside)."""
    ys, xs = np.nonzero(mask)
    y, x = np.mgrid[:mask.shape[0], :mask.shape[1]]
    return np.maximum(np.maximum(ys.min() - y, y - ys.max()), np.maximum(xs.min() - x, x - xs.max())).clip(0)


def test_mask_blur_0_keeps_every_unmasked_pixel(pipe):
    got, want, m = inpaint(pipe, 0)
    assert np.array_equal(got[~m], want[~m]) and not np.array_equal(got[m], want[m])


def test_mask_blur_4_blends_the_seam_and_keeps_pixels_far_from_the_mask(pipe):
    """A1111's Gaussian (sigma 4, kernel half width 10): beyond 3 x 4 pixels the original is exact, in the seam
    just outside the mask the repainted pixels show through."""
    got, want, m = inpaint(pipe, 4)
    sharp, _, _ = inpaint(pipe, 0)
    d = distance_outside(m)
    assert np.array_equal(got[d > 12], want[d > 12])
    seam = (d >= 1) & (d <= 3)
    assert (got[seam] != want[seam]).any(axis=-1).mean() > 0.5
    assert not np.array_equal(got[m], sharp[m])  # inside the edge, the original shows through a little


def test_blur_mask_matches_a1111s_gaussian():
    """A single repainted pixel blurs into the normalised 1-D kernel's outer product, zero beyond half width 10."""
    from sdxl.pipeline import blur_mask

    m = torch.zeros(1, 1, 41, 41, dtype=torch.float64)
    m[..., 20, 20] = 1
    out = blur_mask(m, 4)[0, 0]
    x = torch.arange(-10, 11, dtype=torch.float64)
    k = torch.exp(-x * x / 32) / torch.exp(-x * x / 32).sum()
    torch.testing.assert_close(out[10:31, 10:31], torch.outer(k, k), rtol=0, atol=1e-15)
    assert out.sum() == pytest.approx(1.0) and float(out[:10].abs().max()) == 0 and float(out[:, 31:].abs().max()) == 0
    assert torch.equal(blur_mask(m, 0), m)


@pytest.mark.parametrize("value", [-1, 65])
def test_mask_blur_out_of_range_is_one_line(pipe, value):
    req = Request("x", width=SIZE, height=SIZE, steps=1, init_image=picture(), mask=Image.new("L", (SIZE, SIZE)),
                  mask_blur=value)
    with pytest.raises(SDXLError, match=rf"^mask-blur must be in 0\.\.64 pixels, got {value}$"):
        pipe.generate(req)


def test_infotext_records_the_mask_blur_when_a_mask_is_used():
    from sdxl.formats.png import a1111_parameters

    plain = Request("x", width=SIZE, height=SIZE, init_image=picture(), strength=0.5)
    assert "Mask blur" not in a1111_parameters(plain, {})
    masked = dataclasses.replace(plain, mask=Image.new("L", (SIZE, SIZE)), mask_blur=6)
    assert ", Denoising strength: 0.5, Mask blur: 6," in a1111_parameters(masked, {})
    assert "Mask blur: 4" in a1111_parameters(dataclasses.replace(plain, outpaint=(8, 0, 0, 0)), {})


def test_cli_mask_blur_flag(tmp_path, capsys):
    """--mask-blur reaches the request: recorded in the PNG's infotext and recipe."""
    from sdxl.cli import main
    from sdxl.formats.png import RECIPE_KEY

    picture().save(tmp_path / "init.png")
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, 32, 32))
    mask.save(tmp_path / "mask.png")
    code = main(["generate", "x", "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "--mask-blur", "2", "--width", "64", "--height", "64", "--steps", "1", "--dtype", "fp32", "--seed", "1",
                 "-o", str(tmp_path / "o.png"), "-q", "--no-watermark"])
    assert code == 0
    text = Image.open(tmp_path / "o.png").text
    assert "Mask blur: 2" in text["parameters"] and '"mask_blur": 2' in text[RECIPE_KEY]
    assert main(["generate", "x", "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "--mask-blur", "100", "-o", str(tmp_path / "p.png"), "-q"]) == 2
    assert capsys.readouterr().err.strip().endswith("mask-blur must be in 0..64 pixels, got 100")
