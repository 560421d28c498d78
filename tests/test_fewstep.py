"""Few-step and other SDXL-family models: the LCM and TCD samplers, v-prediction and zero-terminal-SNR schedules.

Sampler parity: diffusers' `LCMScheduler`/`TCDScheduler` drive the toy eps model of test_samplers from per-image seeded
noise on their own timesteps; ours walk the same training sigmas from the same noise and noise streams, and the whole
final latent is compared (float32 rounding: PARITY, atol = rtol = 1e-5; LCM's boundary-condition c_skip, left out by
ours and ComfyUI, is below 2e-7 at these timesteps).
v-prediction and zero terminal SNR: diffusers' SDXL pipeline with `EulerDiscreteScheduler(prediction_type=
"v_prediction", rescale_betas_zero_snr=True)` against ours on the tiny model, whole latents, fp32: END_TO_END
(1e-4, as test_pipeline: diffusers' schedule is float32, ours float64); from sigma 4096 (t = 999) atol 1e-3: both step
in float32, and the first Euler step cancels x ~ 4096 down to ~1, where a float32 ulp is 4.9e-4 (seen: 5.5e-4).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import FAST, randomize, run
from PIL import Image

from sdxl.formats import checkpoint as ck
from sdxl.models.model import TINY_BASE, SDXLModel
from sdxl.pipeline import Pipeline
from sdxl.request import Request
from sdxl.sampling.names import from_a1111, to_a1111
from sdxl.sampling.samplers import SAMPLERS, EpsDenoiser, VDenoiser, default_noise_sampler
from sdxl.sampling.schedules import discrete_sigmas, get_sigmas
from test_samplers import CONFIG, PARITY, SEEDS, needs_diffusers, run_diffusers, toy_eps

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]


def run_ours(sampler: str, scheduler, noise: torch.Tensor, **opts) -> torch.Tensor:
    """Our sampler over the scheduler's training sigmas (then 0), from its initial noise in sigma form."""
    sigmas = torch.cat([discrete_sigmas()[scheduler.timesteps.long()], torch.zeros(1, dtype=torch.float64)])
    x = noise.double() * (1 + sigmas[0] ** 2) ** 0.5  # VP init_noise_sigma 1 in sigma form
    return SAMPLERS[sampler](EpsDenoiser(toy_eps), x, sigmas, noise_sampler=default_noise_sampler(x, SEEDS), **opts)


@needs_diffusers
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_equals_diffusers_lcm_scheduler(steps):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**CONFIG)
    ref, noise, _ = run_diffusers(scheduler, steps, {})
    torch.testing.assert_close(run_ours("lcm", scheduler, noise), ref.double(), **PARITY)


@needs_diffusers
@pytest.mark.parametrize("steps, gamma", [(4, 0.3), (8, 0.3), (4, 0.0), (4, 1.0), (1, 0.3), (6, 0.7)])
def test_tcd_equals_diffusers_tcd_scheduler(steps, gamma):
    from diffusers import TCDScheduler

    scheduler = TCDScheduler(**CONFIG)
    ref, noise, _ = run_diffusers(scheduler, steps, {"eta": gamma})
    torch.testing.assert_close(run_ours("tcd", scheduler, noise, gamma=gamma), ref.double(), **PARITY)


def test_tcd_refuses_gamma_outside_0_1():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="gamma must be in"):
        SAMPLERS["tcd"](EpsDenoiser(toy_eps), x, torch.tensor([1.0, 0.0]), gamma=1.5)


@pytest.mark.parametrize("ours, a1111", [("lcm", "LCM"), ("tcd", "TCD")])
def test_lcm_and_tcd_have_a1111_names(ours, a1111):
    assert to_a1111(ours, "sgm_uniform") == (a1111, "SGM Uniform")
    assert from_a1111(a1111, "SGM Uniform") == (ours, "sgm_uniform") and from_a1111(ours) == (ours, "sgm")


def test_lcm_with_the_exact_consistency_function_returns_the_data_law():
    """Data N(mu, s^2): the consistency function (the probability-flow ODE's map to sigma = 0) is
    mu + s / sqrt(s^2 + sigma^2) (x - mu); LCM's jump-and-renoise keeps the law at every step."""
    mu, s = 0.3, 0.5
    model = lambda x, sigma: mu + s / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5 * (x - mu)  # noqa: E731
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = mu + torch.randn(4096, 1, 4, 4, generator=g, dtype=torch.float64) * (sigmas[0] ** 2 + s**2) ** 0.5
    out = SAMPLERS["lcm"](model, x, sigmas, noise_sampler=lambda a, b: torch.randn(x.shape, generator=g,
                                                                                    dtype=x.dtype))
    assert abs(out.mean().item() - mu) < 0.01 and abs(out.std().item() / s - 1) < 0.01


# ---------------------------------------------------------------- v-prediction, zero terminal SNR

END_TO_END = dict(atol=1e-4, rtol=1e-4)
FROM_4096 = dict(atol=1e-3, rtol=1e-4)
V_ZTSNR = dataclasses.replace(TINY_BASE, prediction="v", zero_terminal_snr=True)


@pytest.fixture(scope="module")
def v_model(tmp_path_factory):
    """A tiny random v-prediction, zero-terminal-SNR base: the model, its single file, its diffusers folder."""
    torch.manual_seed(0)
    model = randomize(SDXLModel(V_ZTSNR), 0, 0.05)
    d = tmp_path_factory.mktemp("vpred")
    return model, ck.save_single_file(model, d / "v.safetensors"), ck.save_diffusers(model, d / "v")


def test_zero_terminal_snr_sigmas_equal_diffusers():
    from diffusers import EulerDiscreteScheduler

    theirs = EulerDiscreteScheduler(**CONFIG, rescale_betas_zero_snr=True)
    ours = discrete_sigmas(zero_terminal_snr=True)
    theirs = ((1 - theirs.alphas_cumprod) / theirs.alphas_cumprod).sqrt().double()  # float32: 2e-5 off near t = 999
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    assert ours[-1].item() == pytest.approx(4096.0, rel=1e-7)  # sqrt((1 - 2^-24) / 2^-24)
    assert ours[0].item() == pytest.approx(discrete_sigmas()[0].item(), rel=1e-12)


def test_v_denoiser_is_x0_from_v():
    """v = sqrt(alphabar) eps - sqrt(1 - alphabar) x0 of a known x0 and eps gives back x0."""
    x0, eps, sigma = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64), 3.0
    a, b = (1 + sigma**2) ** -0.5, sigma * (1 + sigma**2) ** -0.5  # sqrt(alphabar), sqrt(1 - alphabar)
    d = VDenoiser(lambda x_in, t: a * eps - b * x0)
    torch.testing.assert_close(d(x0 + sigma * eps, torch.full((2,), sigma, dtype=torch.float64)), x0)


@needs_diffusers
@pytest.mark.parametrize("schedule, cfg, steps", [("trailing", 5.0, 4), ("leading", 1.0, 3)])
def test_v_prediction_zero_terminal_snr_matches_diffusers(v_model, schedule, cfg, steps):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    model, _, folder = v_model
    theirs = StableDiffusionXLPipeline.from_pretrained(folder)
    spacing = {"timestep_spacing": schedule} | ({"steps_offset": 1} if schedule == "leading" else {})
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config, **spacing)
    assert theirs.scheduler.config.prediction_type == "v_prediction" and theirs.scheduler.config.rescale_betas_zero_snr
    req = Request("a red circle", width=64, height=64, steps=steps, schedule=schedule, cfg=cfg, seed=3, batch=2)
    mine = Pipeline(model, dtype=torch.float32, channels_last=False).generate(req).latents
    lat = theirs(req.prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=cfg, output_type="latent",
                 generator=[torch.Generator().manual_seed(3 + i) for i in range(2)], num_images_per_prompt=2).images
    torch.testing.assert_close(mine, lat, **(FROM_4096 if schedule == "trailing" else END_TO_END))
    eps = Pipeline(model, dtype=torch.float32, channels_last=False).generate(
        dataclasses.replace(req, prediction="epsilon", zero_terminal_snr=False)).latents
    assert (eps - lat).abs().max() > 0.1  # the flags reach the denoiser and the schedule


def test_checkpoint_markers_are_detected(v_model, tmp_path):
    _, single, folder = v_model
    for path in (single, folder):
        cfg = ck.load(path).cfg
        assert (cfg.prediction, cfg.zero_terminal_snr) == ("v", True)
        assert ck.sampling_settings(path) == {"prediction": "v", "zero_terminal_snr": True}
    assert ck.load(single, components=("unet",)).cfg.prediction == "v"
    plain = ck.save_single_file(SDXLModel(TINY_BASE), tmp_path / "eps.safetensors")
    assert ck.sampling_settings(plain) == {"prediction": "epsilon", "zero_terminal_snr": False}


def test_inspect_reads_the_markers_as_the_prediction(v_model, tmp_path, capsys):
    """`sdxl inspect` of a v-prediction single file: its v_pred/ztsnr keys are the prediction, not unexpected keys."""
    _, single, _ = v_model
    info = ck.inspect(single)
    assert info["unexpected_keys"] == [] and info["missing_keys"] == []
    assert info["sampling"] == {"prediction": "v", "zero_terminal_snr": True}
    plain = ck.save_single_file(SDXLModel(TINY_BASE), tmp_path / "eps.safetensors")
    assert ck.inspect(plain)["sampling"] == {"prediction": "epsilon", "zero_terminal_snr": False}
    code, out, _ = run(capsys, "inspect", single)
    assert code == 0 and "prediction:    v, zero terminal SNR\n" in out and "unexpected keys:  0\n" in out


def test_ztsnr_without_v_pred_is_ignored_as_comfyui_does():
    assert ck.sampling_of({"ztsnr": (0,)}) == {"prediction": "epsilon", "zero_terminal_snr": False}


def test_generate_records_and_replays_prediction(v_model, tmp_path, capsys):
    _, single, _ = v_model
    out = tmp_path / "v.png"
    assert run(capsys, "generate", "a cat", "--model", single, "--seed", 4, "-o", out, *FAST)[0] == 0
    info = Image.open(out).info
    assert "Prediction: v" in info["parameters"] and "Zero terminal SNR: True" in info["parameters"]
    rec = json.loads(info["sdxl-recipe"])
    assert (rec["prediction"], rec["zero_terminal_snr"]) == ("v", True)
    again = tmp_path / "again.png"
    assert run(capsys, "generate", "--from-png", out, "-o", again, "--no-watermark", "-q")[0] == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    flat = tmp_path / "eps.png"
    run(capsys, "generate", "a cat", "--model", single, "--seed", 4, "--prediction", "epsilon",
        "--no-zero-terminal-snr", "-o", flat, *FAST)
    rec = json.loads(Image.open(flat).info["sdxl-recipe"])
    assert (rec["prediction"], rec["zero_terminal_snr"]) == ("epsilon", False)
    assert Image.open(flat).tobytes() != Image.open(out).tobytes()


def test_unknown_prediction_is_refused(capsys):
    code, _, err = run(capsys, "generate", "a cat", "--prediction", "x0", *FAST)
    assert code == 2 and "invalid choice: 'x0'" in err
    with pytest.raises(Exception, match="unknown prediction 'x0'; choose one of: epsilon, v"):
        Request("a", prediction="x0").validate(False)


@needs_diffusers
@pytest.mark.parametrize("ztsnr", [False, True])
def test_training_v_target_equals_diffusers_get_velocity(ztsnr):
    from diffusers import DDPMScheduler

    from sdxl.train.loop import target

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 998, 999])
    sigma = discrete_sigmas(zero_terminal_snr=ztsnr).float()[t].view(-1, 1, 1, 1)
    theirs = DDPMScheduler(**CONFIG, rescale_betas_zero_snr=ztsnr).get_velocity(x0, noise, t)
    # diffusers' last alphabar is exactly 0 (v = -x0), ours 2^-24: 2.4e-4 of |noise| apart there
    torch.testing.assert_close(target("v", x0, noise, sigma), theirs, atol=1e-3 if ztsnr else 1e-5, rtol=1e-5)
    assert target("epsilon", x0, noise, sigma) is noise


@pytest.mark.parametrize("min_snr_gamma", [0.0, 5.0])
def test_objective_of_a_v_model_is_v_prediction(min_snr_gamma):
    """A UNet that returns the true velocity (on zero-terminal-SNR sigmas) has loss 0; the noise instead does not."""
    from sdxl.train import loop
    from test_train import tiny

    cfg = tiny(caption_dropout=0.0, offset_noise=0.0, min_snr_gamma=min_snr_gamma)
    torch.manual_seed(0)
    model = loop.build_model(cfg, torch.device("cpu"))
    model.cfg = V_ZTSNR
    batch = {"key": [(7, 0)], "failed": [], "caption": ["a red circle"], "pixels": torch.rand(1, 3, 32, 64) * 2 - 1,
             "original_size": torch.tensor([[32.0, 64.0]]), "crop_coords_top_left": torch.tensor([[0.0, 0.0]]),
             "target_size": torch.tensor([[32.0, 64.0]]), "aesthetic_score": torch.tensor([[6.0]])}
    inputs = loop.prepare(batch, model, loop.Tokenizer.default(), cfg, torch.device("cpu"), None)
    sigma = discrete_sigmas(zero_terminal_snr=True).float()[inputs["t"]].view(-1, 1, 1, 1)
    velocity = (inputs["noise"] - sigma * inputs["latents"]) / (sigma**2 + 1).sqrt()
    model.unet.forward = lambda *a: velocity
    assert loop.Objective(model, cfg)(inputs).abs().max() < 1e-10
    model.unet.forward = lambda *a: inputs["noise"]
    assert loop.Objective(model, cfg)(inputs).min() > 1e-3


# ---------------------------------------------------------------- --unet: UNet-only files


def unet_files(model: SDXLModel, folder) -> dict:
    """The model's UNet as UNet-only files: official keys with and without the prefix, diffusers names."""
    from sdxl.formats.convert import to_theirs, unet_table
    from sdxl.formats.files import write_tensors

    sd = model.unet.state_dict()
    layouts = {"official": {"model.diffusion_model." + k: t for k, t in sd.items()}, "unprefixed": sd,
               "diffusers": to_theirs(unet_table(model.unet.cfg), sd)}
    return {name: write_tensors(folder / f"{name}_unet.safetensors", w, None, mode="new") for name, w in layouts.items()}


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    """A tiny base file, a second model whose UNet replaces the base's, and that UNet as UNet-only files."""
    d = tmp_path_factory.mktemp("unet")
    base = ck.save_single_file(randomize(SDXLModel(TINY_BASE), 0, 0.05), d / "base.safetensors")
    other = randomize(SDXLModel(TINY_BASE), 5, 0.05)
    return base, other, unet_files(other, d)


@pytest.mark.parametrize("layout", ["official", "unprefixed", "diffusers"])
def test_unet_file_replaces_the_bases_unet(swapped, layout):
    base, other, files = swapped
    model = ck.load(base, unet_path=files[layout])
    plain = ck.load(base)
    for k, t in model.state_dict().items():
        theirs = other.state_dict()[k] if k.startswith("model.diffusion_model.") else plain.state_dict()[k]
        assert torch.equal(t, theirs), k


def test_generate_with_unet_records_and_replays_it(swapped, tmp_path, capsys):
    base, _, files = swapped
    out = tmp_path / "u.png"
    assert run(capsys, "generate", "a cat", "--model", base, "--unet", files["diffusers"], "--seed", 2, "-o", out,
               *FAST)[0] == 0
    rec = json.loads(Image.open(out).info["sdxl-recipe"])
    assert rec["models"]["unet"] == str(files["diffusers"]) and "unet" in rec["hashes"]
    again = tmp_path / "again.png"
    assert run(capsys, "generate", "--from-png", out, "-o", again, "--no-watermark", "-q")[0] == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    plain = tmp_path / "plain.png"
    run(capsys, "generate", "a cat", "--model", base, "--seed", 2, "-o", plain, *FAST)
    assert Image.open(plain).tobytes() != Image.open(out).tobytes()


def test_unet_files_that_do_not_fit_are_refused(swapped, tmp_path):
    from sdxl.errors import CheckpointError
    from sdxl.formats.files import write_tensors
    from sdxl.models.model import TINY_REFINER

    base, _, _ = swapped
    (tmp_path / "r").mkdir()
    refiner = unet_files(SDXLModel(TINY_REFINER), tmp_path / "r")["diffusers"]
    vae = write_tensors(tmp_path / "vae.safetensors", SDXLModel(TINY_BASE).vae.state_dict(), None, mode="new")
    sd1 = write_tensors(tmp_path / "sd1.safetensors", {"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, None,
                        mode="new")
    unet = SDXLModel(TINY_BASE).unet.state_dict()
    bad = write_tensors(tmp_path / "bad.safetensors", unet | {"out.2.weight": torch.zeros(2, *unet["out.2.weight"].shape[1:])},
                        None, mode="new")
    for path, message in [(refiner, "a refiner UNet \\(pass it with --refiner\\): its vector input is"),
                          (vae, "not a UNet: no key starts with model.diffusion_model., input_blocks. or down_blocks."),
                          (sd1, "a UNet without SDXL's vector input .*Stable Diffusion 1.x/2.x UNet, not SDXL"),
                          (bad, "1 wrong shape tensor \\(model.diffusion_model.out.2.weight \\(2, ")]:
        with pytest.raises(CheckpointError, match=message):
            ck.load(base, unet_path=path)


@pytest.mark.parametrize("name, scheduler, sampler, schedule", [("LCM", "SGM Uniform", "lcm", "sgm_uniform"),
                                                                 ("TCD", None, "tcd", "sgm"),
                                                                 ("LCM Karras", None, "lcm", "karras")])
def test_a1111_api_maps_lcm_and_tcd(name, scheduler, sampler, schedule):
    from sdxl.serve import a1111

    payload = {"prompt": "x", "sampler_name": name} | ({"scheduler": scheduler} if scheduler else {})
    s = a1111.request_settings(a1111.checked_fields(payload), "txt2img")
    assert (s["sampler"], s["schedule"]) == (sampler, schedule)
    assert {"name": name.split()[0], "aliases": [sampler], "options": {}} in a1111.samplers()  # GET /samplers


def test_eta_sets_tcd_gamma_and_ancestral_noise_and_replays(tmp_path, capsys):
    """--eta reaches the sampler's noise parameter (TCD's gamma, the ancestral samplers' eta): the default value
    gives the default image, another value another image, and the recipe replays it."""
    def image(name, *flags):
        out = tmp_path / f"{name}.png"
        assert run(capsys, "generate", "a red ball", "--seed", 3, "--no-refiner", "-o", out, *flags, *FAST)[0] == 0
        return out

    for sampler, default, other in (("tcd", "0.3", "0.9"), ("euler_ancestral", "1", "0.2")):
        plain, same, changed = (image(f"{sampler}{k}", "--sampler", sampler, *e)
                                for k, e in ((0, ()), (1, ("--eta", default)), (2, ("--eta", other))))
        assert Image.open(plain).tobytes() == Image.open(same).tobytes()
        assert Image.open(plain).tobytes() != Image.open(changed).tobytes()
        assert f"Eta: {float(other)}" in Image.open(changed).info["parameters"]
        again = tmp_path / f"{sampler}-again.png"
        assert run(capsys, "generate", "--from-png", changed, "-o", again, "--no-watermark", "-q")[0] == 0
        assert Image.open(again).tobytes() == Image.open(changed).tobytes()


@pytest.mark.parametrize("flags, message", [
    (("--sampler", "euler", "--eta", "0.5"), "eta applies to samplers that add noise (euler_ancestral"),
    (("--sampler", "tcd", "--eta", "1.5"), "eta must be in [0, 1]"),
    (("--sampler", "ddim", "--eta", "nan"), "eta must be a finite number"),
])
def test_eta_out_of_place_is_refused(flags, message, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a red ball", *flags, "-o", tmp_path / "x.png", *FAST)
    assert code == 2 and message in err and not list(tmp_path.glob("*.png"))
