"""The default model's recipe (sdxl.lab.recipe) and the VAE trainer (sdxl.train.vae), at a tiny scale on CPU."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sdxl.cli import main
from sdxl.formats import checkpoint as ck
from sdxl.lab import recipe
from sdxl.models.model import ModelConfig, SDXLModel
from sdxl.pipeline import Pipeline
from sdxl.request import Request
from sdxl.train.vae import SMALL_VAE, VAETrainConfig, fold_latent_scale, train_vae

pytestmark = pytest.mark.usefixtures("one_thread")


SCALE = 0.001  # 20 images; VAE 2 steps, decoder 1, base 6, refiner 2, each variant 3
SMALL = {"batch_size": 4}  # the recipe's 32 images per step would only make the tests slower


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Every stage of the recipe at SCALE, small batches, with the latent cache; the exported files."""
    out = tmp_path_factory.mktemp("recipe")
    work = out / "run"
    recipe.make_data(work, SCALE, 1)
    recipe.make_vae(work, SCALE, 0, SMALL | {"probe": 8})
    recipe.make_init(work)
    recipe.make_vae_decoder(work, SCALE, 0, {"batch_size": 2, "probe": 4})
    for stage, variant in [("base", ""), ("refiner", "")] + [("variants", v) for v in recipe.VARIANTS]:
        recipe.run_training(stage, work, SCALE, 0, variant, cache=True, overrides=SMALL)
    recipe.export(work, out / "assets", "test")
    recipe.export_variants(work, out / "variants", "test")
    return out


def test_recipe_command_runs_the_stages_it_is_given(tmp_path):
    """`sdxl recipe` (the full run at SCALE is the fixture above, called stage by stage with small batches)."""
    assert main(["recipe", "--out", str(tmp_path / "run"), "--scale", "0.0005", "--stages", "data"]) == 0
    assert (tmp_path / "run" / "data" / "done").is_file() and len(list((tmp_path / "run" / "data").glob("*.png"))) == 10
    assert not (tmp_path / "run" / "vae.safetensors").exists()


def test_latent_scale_is_folded_into_the_weights():
    torch.manual_seed(0)
    vae = SDXLModel(ModelConfig(None, None, SMALL_VAE)).vae
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before_z, before_x = vae.encode(x), vae.decode(vae.encode(x).mean)
        k = fold_latent_scale(vae, x, 0.13025)
        after_z = vae.encode(x)
        torch.testing.assert_close(vae.decode(after_z.mean), before_x, rtol=1e-4, atol=1e-5)  # decoding unchanged
    assert float((after_z.mean * 0.13025).std()) == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(after_z.std, before_z.std * k, rtol=1e-4, atol=1e-7)  # the whole posterior scales


def test_vae_trainer_decoder_only_keeps_the_latent_space(run, tmp_path):
    first = run / "run" / "vae.safetensors"
    meta = json.loads((run / "run" / "vae.json").read_text())
    assert meta["steps"] == 2 and math.isfinite(meta["psnr_db"])
    cfg = VAETrainConfig(dataset=str(run / "run" / "data"), init=str(first), decoder_only=True, crop=0,
                         batch_size=2, steps=2, probe=2)
    second = train_vae(cfg, tmp_path / "dec.safetensors", quiet=True)
    a, b = load_file(str(first)), load_file(str(second))
    enc = [k for k in a if ".encoder." in k or ".quant_conv." in k]
    dec = [k for k in a if ".decoder." in k or "post_quant_conv" in k]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in dec)
    with pytest.raises(Exception, match="already exists"):
        train_vae(cfg, second, quiet=True)


def test_recipe_exports_a_default_model_that_generates(run):
    assets = run / "assets"
    base, refiner = assets / "default_base.safetensors", assets / "default_refiner.safetensors"
    model = ck.load(base)
    assert model.unet.cfg == recipe.BASE_UNET and model.cfg.conditioner.clip_l == recipe.CLIP_L_SMALL
    assert set(load_file(str(refiner))) == {k for k in load_file(str(run / "run" / "refiner" / "final.safetensors"))
                                            if k.startswith("model.diffusion_model.")}  # UNet only
    info = json.loads((assets / "default_model.json").read_text())
    assert info["resolution"] == recipe.RESOLUTION and info["base"]["steps"] == 6 and info["refiner"]["steps"] == 2
    trained = ck.load(run / "run" / "base" / "final.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(trained.unet.state_dict().values(), model.unet.state_dict().values()))
    decoder = ck.load_vae(run / "run" / "vae_decoder.safetensors")  # the exported VAE has the fine-tuned decoder
    assert all(torch.equal(p.half(), q) for p, q in zip(decoder.state_dict().values(), model.vae.state_dict().values()))
    pipe = Pipeline.load(base, refiner, dtype=torch.float32, channels_last=False)
    # the refiner's bigG is the base's, as trained (init_refiner copied it)
    init = ck.load(run / "run" / "init_refiner.safetensors")
    assert all(torch.equal(p.half(), q.half()) for p, q in zip(init.conditioner.bigg.state_dict().values(),
                                                  pipe.base.conditioner.bigg.state_dict().values()))
    # ... and so are the variants' text encoders: eval pairs them with the base's
    variant = ck.load(run / "run" / "init_variant.safetensors")
    assert all(torch.equal(p.half(), q.half()) for p, q in zip(variant.conditioner.state_dict().values(),
                                                              pipe.base.conditioner.state_dict().values()))
    img = pipe.generate(Request("a red circle on a blue background", width=128, height=128, steps=2,
                                refiner_switch=0.5)).images[0]
    assert img.size == (128, 128)
    variants = json.loads((run / "variants" / "variants.json").read_text())
    assert set(variants) == set(recipe.VARIANTS) and variants["no-size-drop-small"]["min_original_size"] == 128
    for name in recipe.VARIANTS:
        sd = load_file(str(run / "variants" / f"{name}.safetensors"))
        assert all(k.startswith("model.diffusion_model.") and v.dtype == torch.float16 for k, v in sd.items())


def test_trainings_share_one_latent_cache(run):
    """Base, refiner and variants read one latent per image (one VAE encoder); text files per set of encoders:
    the base's (shared by the variants) and the refiner's bigG alone. The refiner trains without min-SNR."""
    out = run / "run"
    images = len(list((out / "data").glob("*.png")))
    captions = {p.read_text() for p in (out / "data").glob("*.txt")}
    assert len(list((out / "cache" / "latents").glob("*.safetensors"))) == images
    assert len(list((out / "cache" / "text").glob("*.safetensors"))) == 2 * len(captions)
    base, refiner = recipe.train_config("base", out, 1.0, 0), recipe.train_config("refiner", out, 1.0, 0)
    assert (base.lr, base.min_snr_gamma) == (1e-3, 5.0) and (refiner.lr, refiner.min_snr_gamma) == (3e-4, 0.0)
    assert refiner.timestep_range == (0, 200)


def test_deadline_keeps_the_latest_checkpoint(run, monkeypatch):
    """A time-boxed training stops at the deadline and exports its last checkpoint's EMA weights."""
    out = run / "run"
    cfg = recipe.train_config("variants", out, 0.003, 0, "no-crop")  # 6 steps
    monkeypatch.setattr(recipe, "train_config", lambda *a, **k: __import__("dataclasses").replace(
        cfg, checkpoint_every=2, **SMALL))
    clock = iter(range(10**6))
    monkeypatch.setattr(recipe, "now", lambda: next(clock))  # one tick per step: past the deadline at step 3
    path = recipe.run_training("variants", out, 0.003, 0, "deadline-test", deadline=1.5)
    assert path.name == "partial.safetensors"
    rec = recipe.record(out, "variant-deadline-test")
    assert rec["stopped_at_deadline"] and rec["weights_of_step"] == 2 and rec["steps"] == 3
    ema = load_file(str(out / "variant-deadline-test" / "step-000002" / "ema.safetensors"))
    saved = load_file(str(path))
    assert all(torch.equal(saved[k], v.to(torch.float16)) for k, v in ema.items())
