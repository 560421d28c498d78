"""LyCORIS and DoRA adapters: PEFT parity (LoHa, LoKr, DoRA), formulas ((IA)^3, full, norm), accounting, refusals."""

import functools
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file
from test_lora import FP32_TOL, assert_outputs_close, diffusers_outputs, fresh, outputs

from sdxl.errors import SDXLError
from sdxl.formats import checkpoint as ck
from sdxl.adapters.lora import load_lora, read_adapter, sites, target
from sdxl.models.model import TINY_BASE, TINY_REFINER

peft = pytest.importorskip("peft")

UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2", "conv_shortcut",
        "conv_in", "conv_out", "linear_1", "time_emb_proj", "conv"]  # attention, ResBlocks, resampling, embeddings
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "text_projection"]
CONFIGS = {  # PEFT config class, its arguments; alpha is written into the file as LyCORIS does
    "loha": ("LoHaConfig", dict(r=4, alpha=2.0)),
    "loha-tucker": ("LoHaConfig", dict(r=3, alpha=5.0, use_effective_conv2d=True)),
    "lokr-decomposed-tucker": ("LoKrConfig", dict(r=2, alpha=3.0, decompose_both=True, use_effective_conv2d=True)),
    # full w1 (and w2 where r >= half its size): alpha = r, since LyCORIS scales full-full LoKr by 1, PEFT by alpha / r
    "lokr-full": ("LoKrConfig", dict(r=8, alpha=8.0)),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=2.0, use_dora=True)),
}
PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ck.save_diffusers(fresh(), tmp_path_factory.mktemp("lycoris") / "pipe")


@functools.lru_cache(maxsize=None)
def _site_of(component: str, theirs: str):
    """Our site for a PEFT module path (transformers 5's CLIPTextModel has no `text_model.`)."""
    table = {(s.component, s.theirs.removeprefix("text_model.")): s for s in sites(TINY_BASE)}
    return table[(component, theirs.removeprefix("text_model."))]


@functools.lru_cache(maxsize=None)
def peft_adapter(folder, config: str):
    """PEFT's adapter of `config` on diffusers' UNet and both text encoders, random weights: (merged outputs, tensors)."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    cls, kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for component, targets in (("unet", UNET), ("text_encoder", TEXT[:-1]), ("text_encoder_2", TEXT)):
        model = peft.inject_adapter_in_model(getattr(peft, cls)(target_modules=targets, **kwargs), getattr(pipe, component))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "magnitude" in name:  # DoRA: near the weight norms it starts from
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
                elif ".default" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        tensors |= {f"{component}.{k}": v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
    return diffusers_outputs(pipe), tensors


def as_file(tensors: dict, config: str, naming: str) -> dict:
    """PEFT's tensors under kohya/LyCORIS names (`alpha`; `dora_scale` (out, 1[, 1, 1])) or PEFT's (LoHa/LoKr with
    LyCORIS' `alpha`, DoRA without: its alpha is in diffusers' lora_adapter_metadata)."""
    alpha = CONFIGS[config][1].get("alpha", CONFIGS[config][1].get("lora_alpha"))
    out = {}
    for key, v in tensors.items():
        component, _, rest = key.partition(".")
        module, role = next((rest.removesuffix("." + r), r) for r in (*PEFT_TO_KOHYA, rest.rpartition(".")[2])
                            if rest.endswith("." + r))
        site = _site_of(component, module)
        name = site.kohya if naming == "kohya" else f"{component}.{module}"
        if naming == "kohya" and role in PEFT_TO_KOHYA:
            role, v = PEFT_TO_KOHYA[role], (v.reshape(-1, *[1] * (v.ndim - 1)) if "magnitude" in role else v)
        out[f"{name}.{role}"] = v.contiguous()
        if naming == "kohya" or config != "dora":
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def adapter_metadata(config: str) -> dict:
    """diffusers' lora_adapter_metadata (LoraConfig fields per component)."""
    kw = CONFIGS[config][1]
    return {"lora_adapter_metadata": json.dumps({f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2")
                                                 for k, v in (("r", kw["r"]), ("lora_alpha", kw["lora_alpha"]))})}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_peft_parity(folder, tmp_path, config):
    """PEFT's LoHa / LoKr / DoRA merged into diffusers' model == ours merged from the file, kohya and PEFT names
    (fp32, rtol = atol = 1e-5)."""
    theirs, tensors = peft_adapter(folder, config)
    plain = outputs(fresh())
    assert all((theirs[k] - plain[k]).abs().max() > 1e-2 for k in plain), "the adapter must change every output"
    kinds = {"lora+dora" if config == "dora" else config.split("-")[0]}
    for naming in ("kohya", "peft"):
        meta = adapter_metadata(config) if config == "dora" and naming == "peft" else None
        save_file(as_file(tensors, config, naming), tmp_path / f"{naming}.safetensors", metadata=meta)
        model = fresh()
        report = load_lora(model, tmp_path / f"{naming}.safetensors")
        assert report.skipped == {} and set(report.kinds) == kinds and report.format == naming
        assert report.total == sum(k.endswith(".alpha") for k in as_file(tensors, config, "kohya")), naming
        assert_outputs_close(outputs(model), theirs, f"{config} {naming}")


def test_lokr_forms_in_peft_parity(folder):
    """The LoKr configurations above cover every factor form LyCORIS writes."""
    forms = set()
    for config in ("lokr-decomposed-tucker", "lokr-full"):
        _, tensors = peft_adapter(folder, config)
        forms |= {k.rpartition(".")[2] for k in tensors}
    assert forms == {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


# --- the formulas of kinds PEFT has no SDXL form of -------------------------------------------------

PROJ_IN = "lora_unet_middle_block_1_proj_in"  # Linear(128 -> 128) on the tiny base
CONV = "lora_unet_input_blocks_1_0_in_layers_2"  # Conv2d(64 -> 64, 3x3)
KEY = {PROJ_IN: "model.diffusion_model.middle_block.1.proj_in", CONV: "model.diffusion_model.input_blocks.1.0.in_layers.2"}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def merged(tmp_path, tensors: dict, cfg=TINY_BASE, **kw) -> tuple[dict, dict]:
    """(state before, state after) merging `tensors` as a file into a fresh model."""
    save_file(tensors, tmp_path / "a.safetensors")
    model = fresh(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_lora(model, tmp_path / "a.safetensors", **kw)
    return before, model.state_dict()


@pytest.mark.parametrize("module", [PROJ_IN, CONV])
@pytest.mark.parametrize("on_input", [0, 1])
def test_ia3_scales_channels(tmp_path, module, on_input):
    """(IA)^3 (LyCORIS ia3.py): W * (1 + m * w) per output channel, or per input channel with on_input."""
    w0 = fresh().state_dict()[KEY[module] + ".weight"]
    v = rand(w0.shape[on_input])
    before, after = merged(tmp_path, {f"{module}.weight": v, f"{module}.on_input": torch.tensor(on_input)}, multiplier=0.5)
    shape = [-1 if i == on_input else 1 for i in range(w0.ndim)]
    torch.testing.assert_close(after[KEY[module] + ".weight"], w0 * (1 + 0.5 * v.reshape(shape)), **FP32_TOL)


def test_full_diff_and_norm_layers(tmp_path):
    """`diff`/`diff_b` (full.py) and `w_norm`/`b_norm` (norms.py) add themselves; alpha plays no part."""
    norm = "lora_te2_text_model_final_layer_norm"  # bigG's ln_final, not mapped before
    t = {f"{CONV}.diff": rand(64, 64, 3, 3), f"{CONV}.diff_b": rand(64, seed=1), f"{CONV}.alpha": torch.tensor(7.0),
         f"{norm}.w_norm": rand(128, seed=2), f"{norm}.b_norm": rand(128, seed=3),
         "lora_unet_out_0.w_norm": rand(64, seed=4)}  # GroupNorm without b_norm
    before, after = merged(tmp_path, t, multiplier=2.0, te_multiplier=-1.0)
    expect = {KEY[CONV] + ".weight": 2 * t[f"{CONV}.diff"], KEY[CONV] + ".bias": 2 * t[f"{CONV}.diff_b"],
              "conditioner.embedders.1.model.ln_final.weight": -t[f"{norm}.w_norm"],
              "conditioner.embedders.1.model.ln_final.bias": -t[f"{norm}.b_norm"],
              "model.diffusion_model.out.0.weight": 2 * t["lora_unet_out_0.w_norm"]}
    for k in before:
        torch.testing.assert_close(after[k] - before[k], expect.get(k, torch.zeros_like(before[k])), **FP32_TOL)


def test_locon_tucker_mid(tmp_path):
    """LoCon with `lora_mid` (LyCORIS functional/locon.py): dW[o, i] = sum up[o, n] mid[n, m] down[m, i] per tap."""
    down, mid, up = rand(2, 64, 1, 1), rand(2, 2, 3, 3, seed=1), rand(64, 2, 1, 1, seed=2)
    t = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid, f"{CONV}.lora_up.weight": up,
         f"{CONV}.alpha": torch.tensor(1.0)}
    before, after = merged(tmp_path, t)
    expect = torch.einsum("on,nmkl,mi->oikl", up.flatten(1), mid, down.flatten(1)) / 2
    torch.testing.assert_close(after[KEY[CONV] + ".weight"] - before[KEY[CONV] + ".weight"], expect, **FP32_TOL)


def test_lokr_alpha_only_when_decomposed(tmp_path):
    """LyCORIS lokr.py: full lokr_w1 and lokr_w2 ignore alpha; a decomposed factor brings alpha / rank."""
    w1, w2, a, b = rand(8, 8), rand(16, 16, seed=1), rand(16, 2, seed=2), rand(2, 16, seed=3)
    full = {f"{PROJ_IN}.lokr_w1": w1, f"{PROJ_IN}.lokr_w2": w2, f"{PROJ_IN}.alpha": torch.tensor(8.0)}
    before, after = merged(tmp_path, full)
    k = KEY[PROJ_IN] + ".weight"
    torch.testing.assert_close(after[k] - before[k], torch.kron(w1, w2), **FP32_TOL)
    half = {f"{PROJ_IN}.lokr_w1": w1, f"{PROJ_IN}.lokr_w2_a": a, f"{PROJ_IN}.lokr_w2_b": b, f"{PROJ_IN}.alpha": torch.tensor(1.0)}
    before, after = merged(tmp_path / "..", half)
    torch.testing.assert_close(after[k] - before[k], torch.kron(w1, a @ b) / 2, **FP32_TOL)


@pytest.mark.parametrize("axis", [0, 1])
def test_kohya_dora_scale_on_either_axis(tmp_path, axis):
    """LyCORIS dora_scale (out, 1, 1, 1) (wd_on_out) or (1, in, 1, 1): m * V / ||V|| per that channel, V = W + dW."""
    w0 = fresh().state_dict()[KEY[CONV] + ".weight"]
    down, up, m = rand(2, 64, 3, 3), rand(64, 2, 1, 1, seed=1), 1 + rand(64, seed=2)
    shape = [-1 if i == axis else 1 for i in range(4)]
    t = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_up.weight": up, f"{CONV}.alpha": torch.tensor(1.0),
         f"{CONV}.dora_scale": m.reshape(shape)}
    _, after = merged(tmp_path, t, multiplier=0.5)
    v = w0 + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    norm = torch.linalg.vector_norm(v, dim=[i for i in range(4) if i != axis], keepdim=True)
    # the multiplier interpolates between the base and the DoRA weight (A1111, ComfyUI)
    torch.testing.assert_close(after[KEY[CONV] + ".weight"], w0 + 0.5 * (m.reshape(shape) * v / norm - w0), **FP32_TOL)


def test_patches_are_the_api(tmp_path):
    """read_adapter changes nothing; each patch's delta is dW at multiplier 1 for the tensor `target` gives."""
    t = {f"{PROJ_IN}.hada_w1_a": rand(128, 2), f"{PROJ_IN}.hada_w1_b": rand(2, 128, seed=1),
         f"{PROJ_IN}.hada_w2_a": rand(128, 2, seed=2), f"{PROJ_IN}.hada_w2_b": rand(2, 128, seed=3),
         f"{PROJ_IN}.alpha": torch.tensor(1.0), f"{CONV}.diff": rand(64, 64, 3, 3), f"{CONV}.diff_b": rand(64, seed=4)}
    save_file(t, tmp_path / "a.safetensors")
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = read_adapter(model, tmp_path / "a.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sorted((p.site.kohya, p.param, p.kind, p.component) for p in adapter.patches) == [
        (CONV, "bias", "full", "unet"), (CONV, "weight", "full", "unet"), (PROJ_IN, "weight", "loha", "unet")]
    p = next(p for p in adapter.patches if p.kind == "loha")
    dw = p.delta(target(model, p.site))
    assert dw.dtype == torch.float32
    expect = (t[f"{PROJ_IN}.hada_w1_a"] @ t[f"{PROJ_IN}.hada_w1_b"]) * (t[f"{PROJ_IN}.hada_w2_a"] @ t[f"{PROJ_IN}.hada_w2_b"]) / 2
    torch.testing.assert_close(dw, expect, **FP32_TOL)


# --- accounting -------------------------------------------------------------------------------------

def test_layers_kohya_names_that_were_not_mapped_are_applied(tmp_path):
    """text_projection, final layer norms, time/label embeddings, conv_in/out: layers the model has."""
    names = {"lora_te2_text_projection": (128, 96), "lora_unet_time_embed_0": (64, 256), "lora_unet_label_emb_0_0": (1632, 256),
             "lora_unet_conv_in": (4, 64), "lora_unet_out_2": (64, 4), "lora_te1_text_model_final_layer_norm": None}
    t = {}
    for i, (n, shape) in enumerate(names.items()):
        if shape is None:
            t |= {f"{n}.w_norm": rand(128, seed=i), f"{n}.b_norm": rand(128, seed=i)}
        else:
            k = (3, 3) if "conv" in n or "out_2" in n else ()
            t |= {f"{n}.lora_down.weight": rand(2, shape[0], *k, seed=i), f"{n}.lora_up.weight": rand(shape[1], 2, *[1] * len(k), seed=i),
                  f"{n}.alpha": torch.tensor(2.0)}
    save_file(t, tmp_path / "a.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_lora(fresh(), tmp_path / "a.safetensors")
    assert report.applied == {"unet": 4, "text_encoder": 1, "text_encoder_2": 1} and report.skipped == {}


def test_modules_for_missing_layers_are_skipped_with_one_warning(tmp_path):
    """A refiner (no CLIP-L) given lora_te_ for bigG plus layers it lacks: applied, the rest counted in one warning."""
    t = {}
    for n, (i, o) in {"lora_te_text_model_encoder_layers_0_mlp_fc1": (128, 512), "lora_unet_middle_block_1_proj_in": (128, 128),
                      "lora_unet_input_blocks_40_1_proj_in": (128, 128), "lora_unet_input_blocks_41_1_proj_in": (128, 128),
                      "lora_te2_text_model_encoder_layers_99_mlp_fc1": (128, 512)}.items():
        t |= {f"{n}.lora_down.weight": rand(2, i), f"{n}.lora_up.weight": rand(o, 2), f"{n}.alpha": torch.tensor(2.0)}
    save_file(t, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning) as caught:
        report = load_lora(fresh(TINY_REFINER), tmp_path / "a.safetensors")
    assert len(caught) == 1
    assert re.search(r"a.safetensors: skipped 3 modules for layers this sdxl-custom model does not have \(unet: 2, "
                     r"text_encoder_2: 1; lora_te2_text_model_encoder_layers_99_mlp_fc1, lora_unet_input_blocks_40_1_proj_in, "
                     r"lora_unet_input_blocks_41_1_proj_in\)", str(caught[0].message))
    assert report.skipped == {"unet": 2, "text_encoder_2": 1}
    assert report.applied == {"unet": 1, "text_encoder": 0, "text_encoder_2": 1}


def _lora(names: dict) -> dict:
    t = {}
    for n, (i, o) in names.items():
        t |= {f"{n}.lora_down.weight": torch.zeros(2, i), f"{n}.lora_up.weight": torch.zeros(o, 2)}
    return t


@pytest.mark.parametrize("tensors,arch", [
    (_lora({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320)}), "SD 1.x"),
    (_lora({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (1024, 320)}), "SD 2.x"),
    (_lora({"lora_unet_output_blocks_11_1_proj_in": (320, 320), "lora_unet_middle_block_1_proj_in": (128, 128)}), "SD 1.x/2.x"),
    (_lora({"lora_unet_joint_blocks_0_x_block_attn_qkv": (1536, 4608)}), "SD3"),
    (_lora({"transformer.transformer_blocks.0.attn.to_q": (1536, 1536)}), "SD3"),
    (_lora({"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)}), "Flux"),
    (_lora({"transformer.single_transformer_blocks.0.proj_out": (3072, 3072)}), "Flux"),
], ids=["sd1", "sd2", "sd-unknown-width", "sd3-kohya", "sd3-diffusers", "flux-kohya", "flux-diffusers"])
def test_other_architectures_are_refused_by_name(tmp_path, tensors, arch):
    save_file(tensors, tmp_path / "other.safetensors")
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SDXLError, match=rf"other.safetensors: an adapter for {re.escape(arch)}, not this sdxl-custom model"):
        load_lora(model, tmp_path / "other.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tensors,message", [
    ({f"{PROJ_IN}.oft_blocks": torch.zeros(4, 32, 32), f"{PROJ_IN}.alpha": torch.tensor(1.0)},
     r"a LyCORIS OFT/BOFT adapter, which is not supported \(supported: lora, loha, lokr, ia3, full, norm, DoRA\)"),
    ({f"{PROJ_IN}.a1.weight": rand(2, 128), f"{PROJ_IN}.a2.weight": rand(128, 2), f"{PROJ_IN}.b1.weight": rand(2, 128),
      f"{PROJ_IN}.b2.weight": rand(128, 2)}, "a LyCORIS GLoRA adapter, which is not supported"),
    ({f"{PROJ_IN}.lokr_w1": torch.zeros(8, 8)}, f"{PROJ_IN} lacks lokr_w2 or lokr_w2_a and lokr_w2_b"),
    ({f"{PROJ_IN}.hada_w1_a": rand(128, 2), f"{PROJ_IN}.hada_w1_b": rand(2, 128), f"{PROJ_IN}.hada_w2_a": rand(64, 2),
      f"{PROJ_IN}.hada_w2_b": rand(2, 128)}, rf"{PROJ_IN}: hada_w1_a \(128, 2\) hada_w1_b \(2, 128\) hada_w2_a \(64, 2\) "
                                             r"hada_w2_b \(2, 128\) for a weight \(128, 128\)"),
    ({f"{PROJ_IN}.weight": rand(64), f"{PROJ_IN}.on_input": torch.tensor(0)}, rf"{PROJ_IN}: weight \(64,\) for a weight"),
    ({f"{PROJ_IN}.lora_down.weight": rand(2, 128), f"{PROJ_IN}.lora_up.weight": rand(128, 2),
      f"{PROJ_IN}.dora_scale": rand(64, 1)}, rf"{PROJ_IN}: DoRA magnitude \(64, 1\) for a weight \(128, 128\)"),
    ({"lora_unet_middle_block_1_proj_in.diff": rand(128, 128), f"{PROJ_IN}.weight": rand(128)}, "no adapter weights"),
    ({f"{PROJ_IN}.diff": rand(128, 128), f"{PROJ_IN}.w_norm": rand(128)},
     rf"{PROJ_IN}: full with tensors of another kind \(w_norm\)"),
], ids=["oft", "glora", "lokr-no-w2", "loha-misfit", "ia3-misfit", "dora-misfit", "weight-without-on_input", "two-kinds"])
def test_bad_lycoris_files_change_nothing(tmp_path, tensors, message):
    save_file(tensors, tmp_path / "bad.safetensors")
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SDXLError, match=message):
        load_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
