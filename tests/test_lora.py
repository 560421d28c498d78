"""LoRA: wrap, save (kohya, peft), load (merge) back, diffusers reading our files, names, bad input."""

import functools
import json
import pickle

import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file, save_file

from sdxl.formats import checkpoint as ck
from sdxl.models.conditioning import FourierEmbedder
from sdxl.errors import CheckpointError, SDXLError
from sdxl.adapters.lora import (CONV_TARGETS, DEFAULT_TARGETS, PEFT_FILE, FusedQKVLoRA, LoRA, add_lora, load_lora,
                       lora_modules, lora_state_dict, merge_lora, save_lora, sites)
from sdxl.models.model import SDXL_BASE, TINY_BASE, TINY_REFINER, ModelConfig, SDXLModel

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
ALL_TARGETS = DEFAULT_TARGETS + CONV_TARGETS  # also 3x3 (stride 1 and 2) and 1x1 convolutions


@functools.lru_cache(maxsize=None)
def _random_state(cfg: ModelConfig) -> dict:
    torch.manual_seed(0)
    return randomize(SDXLModel(cfg), seed=0, scale=0.05).state_dict()


def fresh(cfg: ModelConfig = TINY_BASE) -> SDXLModel:
    """The same random tiny model every call (fp32); built on meta, so nothing is initialised twice."""
    model = SDXLModel(cfg, device="meta")
    model.load_state_dict({k: v.clone() for k, v in _random_state(cfg).items()}, assign=True)
    return model.eval()


def inputs(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Fixed UNet and text encoder inputs; the UNet's `y` is pooled ++ Fourier features of the micro-conditioning."""
    g = torch.Generator().manual_seed(1)
    pooled_dim = cfg.conditioner.bigg.proj_dim
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64][:(cfg.unet.adm_in_channels - pooled_dim) // 256]] * 2)
    tokens = torch.randint(0, 49000, (2, 12), generator=g)
    tokens[:, 9] = 49407  # EOS: the argmax, where bigG pools
    return {"x": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([300.0, 900.0]),
            "ctx": torch.randn(2, 5, cfg.unet.context_dim, generator=g), "text_embeds": torch.randn(2, pooled_dim, generator=g),
            "time_ids": time_ids, "tokens": tokens}


def outputs(model: SDXLModel) -> dict[str, torch.Tensor]:
    """UNet eps, cross-attention context and pooled embedding on fixed inputs."""
    cfg, i = model.cfg, inputs(model.cfg)
    y = torch.cat([i["text_embeds"], FourierEmbedder(256)(i["time_ids"])], 1)
    with torch.no_grad():
        crossattn, pooled = model.conditioner.encode_text(i["tokens"] if cfg.conditioner.clip_l else None, i["tokens"])
        return {"unet": model.unet(i["x"], i["t"], i["ctx"], y), "crossattn": crossattn, "pooled": pooled}


def trained(cfg: ModelConfig = TINY_BASE, targets=ALL_TARGETS, rank: int = 4, alpha: float = 2.0) -> SDXLModel:
    """A model with LoRA on the UNet and both text encoders, random down and up weights (as if trained)."""
    model = fresh(cfg)
    params = add_lora(model, rank=rank, alpha=alpha, text_encoders=True, targets=targets)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def assert_outputs_close(a: dict, b: dict, what: str) -> None:
    for k in a:
        err = (a[k] - b[k]).abs().max().item()
        print(f"{what} {k}: max abs err {err:.2e} (values up to {a[k].abs().max().item():.2f})")
        torch.testing.assert_close(a[k], b[k], **FP32_TOL)


# --- names -----------------------------------------------------------------------------------------

def test_default_targets_are_kohyas_sdxl_lora():
    """kohya sd-scripts' SDXL LoRA: 722 UNet modules, 72 for CLIP-L, 192 for bigG; its names and diffusers'."""
    chosen = [s for s in sites(SDXL_BASE) if any(s.path.endswith("." + t) for t in DEFAULT_TARGETS)]
    counts = {c: sum(s.component == c for s in chosen) for c in ("unet", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}
    names = {s.kohya: s.peft for s in chosen}
    assert len(names) == len(chosen)
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0": "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj": "unet.mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj",
        "lora_unet_output_blocks_5_1_proj_out": "unet.up_blocks.1.attentions.2.proj_out",
        "lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_2": "unet.up_blocks.0.attentions.0.transformer_blocks.3.ff.net.2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te1_text_model_encoder_layers_11_mlp_fc2": "text_encoder.text_model.encoder.layers.11.mlp.fc2",
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj",
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj": "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": "text_encoder_2.text_model.encoder.layers.31.mlp.fc1",
    }
    assert {k: names.get(k) for k in expected} == expected


def test_tiny_kohya_file_names(tmp_path):
    model = trained(TINY_BASE, DEFAULT_TARGETS)
    path = save_lora(model, tmp_path / "l.safetensors")
    keys = set(load_file(path))
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_0_proj",
                 "lora_te1_text_model_encoder_layers_2_self_attn_out_proj", "lora_te2_text_model_encoder_layers_0_self_attn_v_proj",
                 "lora_te2_text_model_encoder_layers_1_mlp_fc2"):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys, name
    assert load_file(path)["lora_unet_middle_block_1_proj_in.alpha"].item() == 2.0
    assert not any("in_proj" in k or "c_fc" in k or "input_blocks_1_0" in k for k in keys)
    assert ck.SafetensorsFile(path).metadata["ss_network_dim"] == "4"


# --- training modules ------------------------------------------------------------------------------

def test_fresh_lora_is_a_noop_and_trains_only_itself():
    model = fresh()
    before = outputs(model)
    base_params = set(map(id, model.parameters()))
    params = add_lora(model, rank=4, text_encoders=True, targets=ALL_TARGETS)
    assert not base_params & set(map(id, params)) and all(p.requires_grad for p in params)
    assert len(params) == len({id(p) for p in params}) == 2 * len(lora_modules(model))
    assert {id(p) for p in model.parameters()} == base_params | set(map(id, params))
    assert any(isinstance(m, FusedQKVLoRA) for m in model.modules())
    after = outputs(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SDXLError, match="already has a LoRA"):
        add_lora(model)


def test_gradients_reach_the_lora_weights():
    model = fresh()
    params = add_lora(model, rank=4, text_encoders=True)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.01)  # up weights non-zero, so that the down weights get gradients too
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 49000, (1, 8), generator=g)
    crossattn, pooled = model.conditioner.encode_text(tokens, tokens)
    eps = model.unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), crossattn,
                     torch.cat([pooled, torch.randn(1, 6 * 256, generator=g)], 1))
    (eps.square().mean() + pooled.square().mean()).backward()
    last_clip_layer = f"conditioner.embedders.0.transformer.text_model.encoder.layers.{TINY_BASE.conditioner.clip_l.layers - 1}."
    for site, m in lora_modules(model):
        used = not site.path.startswith(last_clip_layer)  # SDXL never uses CLIP-L's last layer
        assert (m.lora_down.weight.grad is not None and m.lora_down.weight.grad.abs().sum() > 0) == used, site.path


def test_fp32_lora_on_a_bf16_model(tmp_path):
    model = fresh().to(torch.bfloat16)
    params = add_lora(model, rank=4, text_encoders=True, targets=ALL_TARGETS, dtype=torch.float32)
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.1)
    i = inputs(TINY_BASE)
    y = torch.cat([i["text_embeds"], FourierEmbedder(256)(i["time_ids"])], 1)
    eps = model.unet(i["x"], i["t"], i["ctx"], y)
    assert eps.dtype == torch.bfloat16
    eps.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params[:2])
    path = save_lora(model, tmp_path / "l.safetensors", dtype=torch.float16)
    assert {t.dtype for k, t in load_file(path).items() if not k.endswith(".alpha")} == {torch.float16}
    target = fresh().to(torch.bfloat16)
    load_lora(target, path)
    merge_lora(model)
    for k, v in model.state_dict().items():  # merged in fp32, rounded once to bf16 either way (fp16 file: ~1e-3)
        torch.testing.assert_close(v.float(), target.state_dict()[k].float(), rtol=2e-2, atol=2e-3)


# --- save -> load round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY_BASE, TINY_REFINER], ids=["base", "refiner"])
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_save_then_load_merges_the_same_model(tmp_path, fmt, cfg):
    model = trained(cfg)
    ref = outputs(model)
    plain = outputs(fresh(cfg))
    assert all((ref[k] - plain[k]).abs().max() > 1e-3 for k in ref), "the LoRA must change every output"
    path = save_lora(model, tmp_path / "lora.safetensors", format=fmt)

    target = fresh(cfg)
    report = load_lora(target, path)
    assert_outputs_close(ref, outputs(target), f"{fmt} load")
    expected = {c: sum(s.component == c for s, _ in lora_modules(model)) for c in report.applied}
    assert report.applied == expected and report.format == fmt and report.total == len(lora_modules(model))
    assert (expected["text_encoder"] > 0) == (cfg is TINY_BASE) and expected["text_encoder_2"] > 0

    # merging the wrappers gives the same model, with the official keys again
    assert merge_lora(model) == report.total
    assert not any(isinstance(m, (LoRA, FusedQKVLoRA)) for m in model.modules())
    assert_outputs_close(ref, outputs(model), "merge_lora")
    merged, loaded = model.state_dict(), target.state_dict()
    assert merged.keys() == loaded.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], loaded[k], rtol=1e-6, atol=1e-6)


def test_multiplier_scales_linearly(tmp_path):
    model = trained()
    path = save_lora(model, tmp_path / "l.safetensors")
    base = fresh().state_dict()
    full, half = fresh(), fresh()
    load_lora(full, path, multiplier=1.0)
    assert load_lora(half, path, multiplier=0.5).multiplier == 0.5
    full, half = full.state_dict(), half.state_dict()
    changed = [k for k in base if not torch.equal(base[k], full[k])]
    assert len(changed) == len({s.path for s, _ in lora_modules(model)})  # bigG's q, k, v share in_proj_weight
    for k in changed:
        torch.testing.assert_close(half[k] - base[k], 0.5 * (full[k] - base[k]), rtol=1e-5, atol=1e-6)
    # the wrappers' multiplier does the same
    for _, m in lora_modules(model):
        m.multiplier = 0.5
    merge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, half[k], rtol=1e-5, atol=1e-6)


def _renamed(sd: dict, rename) -> dict:
    return {rename(k): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def spellings(tmp_path_factory):
    """A trained tiny base LoRA, the model it merges into (reference), and its kohya, PEFT and unscaled PEFT tensors."""
    model = trained(TINY_BASE, DEFAULT_TARGETS)
    ref = fresh()
    load_lora(ref, save_lora(model, tmp_path_factory.mktemp("spellings") / "ref.safetensors"))
    unscaled = {f"{s.peft}.lora_{ab}.weight": getattr(m, layer).weight.detach()
                for s, m in lora_modules(model) for ab, layer in (("A", "lora_down"), ("B", "lora_up"))}
    return {"model": model, "ref": ref.state_dict(), "kohya": lora_state_dict(model, "kohya"),
            "peft": lora_state_dict(model, "peft"), "unscaled": unscaled,
            "site_of": {s.kohya: s for s, _ in lora_modules(model)} | {s.peft: s for s, _ in lora_modules(model)}}


def kohya_diffusers_names(site_of: dict, k: str) -> str:
    """lora_unet_<diffusers path>, lora_te_ for CLIP-L (both read by ComfyUI)."""
    name, _, rest = k.partition(".")
    s = site_of[name]
    if s.component == "unet":
        return "lora_unet_" + s.theirs.replace(".", "_") + "." + rest
    return name.replace("lora_te1_", "lora_te_") + "." + rest


def old_diffusers(site_of: dict, k: str) -> str:
    """diffusers < 0.21: attention processors and text encoder patches."""
    name, suffix = k.rsplit(".lora_", 1)
    s = site_of[name]
    role = "down" if suffix.startswith("A") else "up"
    if s.component == "unet" and s.theirs.split(".")[-1] in ("to_q", "to_k", "to_v"):
        attn, proj = s.theirs.rsplit(".", 1)
        return f"unet.{attn}.processor.{proj}_lora.{role}.weight"
    if s.component == "unet" and s.theirs.endswith("to_out.0"):
        return f"unet.{s.theirs.removesuffix('.to_out.0')}.processor.to_out_lora.{role}.weight"
    if s.component == "unet":
        return f"unet.{s.theirs}.lora.{role}.weight"
    return f"{s.peft}.lora_linear_layer.{role}.weight"


def transformers5(site_of: dict, k: str) -> str:
    """No `unet.` prefix; CLIPTextModel without `text_model.`."""
    return k.removeprefix("unet.").replace("text_encoder.text_model.", "text_encoder.")


def adapter_metadata(**extra) -> dict:
    """diffusers' lora_adapter_metadata: rank 4, alpha 2 for every component, plus `extra` (component.key)."""
    meta = {f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2")
            for k, v in (("r", 4), ("lora_alpha", 2.0), ("alpha_pattern", {}))}
    return {"lora_adapter_metadata": json.dumps(meta | extra)}


@pytest.mark.parametrize("variant,source,rename,fmt", [
    ("kohya-diffusers", "kohya", kohya_diffusers_names, "kohya"),
    ("old-diffusers", "peft", old_diffusers, "diffusers-old"),
    ("transformers5", "peft", transformers5, "peft"),
    ("peft-metadata", "unscaled", None, "peft"),  # alpha in diffusers' adapter metadata, not folded into lora_B
])
def test_other_spellings_load_the_same(spellings, tmp_path, variant, source, rename, fmt):
    """kohya files with diffusers UNet names or `lora_te_`, older diffusers names, transformers 5 names, PEFT metadata."""
    sd = spellings[source] if rename is None else _renamed(spellings[source], lambda k: rename(spellings["site_of"], k))
    path = tmp_path / f"{variant}.safetensors"
    save_file(sd, path, metadata=adapter_metadata() if source == "unscaled" else None)
    got = fresh()
    report = load_lora(got, path)
    assert report.format == fmt and report.total == len(lora_modules(spellings["model"]))
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, spellings["ref"][k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{variant} {k}: {m}")


def test_peft_alpha_pattern_gives_one_module_another_alpha(spellings, tmp_path):
    meta = adapter_metadata(**{"unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 8.0}})
    save_file(spellings["unscaled"], tmp_path / "pattern.safetensors", metadata=meta)
    got = fresh()
    load_lora(got, tmp_path / "pattern.safetensors")
    base, ref = fresh().state_dict(), spellings["ref"]
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    torch.testing.assert_close(got.state_dict()[key] - base[key], 4 * (ref[key] - base[key]), rtol=1e-5, atol=1e-6)


def test_refiner_bigg_as_lora_te(tmp_path):
    """The refiner's only text encoder (bigG) as `lora_te_`, as ComfyUI names it."""
    refiner = trained(TINY_REFINER, DEFAULT_TARGETS)
    ref = fresh(TINY_REFINER)
    load_lora(ref, save_lora(refiner, tmp_path / "refiner.safetensors"))
    sd = _renamed(lora_state_dict(refiner), lambda k: k.replace("lora_te2_", "lora_te_"))
    save_file(sd, tmp_path / "refiner_te.safetensors")
    got = fresh(TINY_REFINER)
    assert load_lora(got, tmp_path / "refiner_te.safetensors").applied["text_encoder_2"] == 3 * 6
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got.state_dict().items())


# --- diffusers reads our files -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """Our tiny random base as a diffusers folder."""
    return ck.save_diffusers(fresh(), tmp_path_factory.mktemp("lora") / "pipe")


def diffusers_outputs(pipe) -> dict[str, torch.Tensor]:
    """What `outputs` computes, computed by diffusers and transformers."""
    i = inputs(TINY_BASE)
    with torch.no_grad():
        eps = pipe.unet(i["x"], i["t"], i["ctx"], added_cond_kwargs={k: i[k] for k in ("text_embeds", "time_ids")}).sample
        hidden_l = pipe.text_encoder(i["tokens"], output_hidden_states=True).hidden_states[-2]
        g = pipe.text_encoder_2(i["tokens"], output_hidden_states=True)
    return {"unet": eps, "crossattn": torch.cat([hidden_l, g.hidden_states[-2]], -1), "pooled": g.text_embeds}


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_diffusers_loads_our_lora(diffusers_folder, tmp_path, fmt):
    """diffusers' load_lora_weights with our file == our model with the LoRA merged (needs peft, diffusers' LoRA backend)."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline

    model = trained(TINY_BASE, ALL_TARGETS)
    path = save_lora(model, tmp_path if fmt == "peft" else tmp_path / "kohya.safetensors", format=fmt)
    pipe = StableDiffusionXLPipeline.from_pretrained(diffusers_folder)
    plain = diffusers_outputs(pipe)
    assert_outputs_close(outputs(fresh()), plain, "diffusers without LoRA")
    pipe.load_lora_weights(tmp_path, **({} if fmt == "peft" else {"weight_name": path.name}))
    theirs = diffusers_outputs(pipe)
    assert all((theirs[k] - plain[k]).abs().max() > 1e-3 for k in plain), "diffusers must apply the LoRA"
    wrapped = {s for s, _ in lora_modules(model)}
    merge_lora(model)
    assert_outputs_close(outputs(model), theirs, f"diffusers with our {fmt} LoRA")
    # our names are diffusers' / transformers' layer names (CLIPTextModel may drop `text_model.`), and
    # diffusers put a LoRA on exactly the layers we did
    for s in sites(TINY_BASE):
        layers = dict(getattr(pipe, s.component).named_modules())
        name = s.theirs if s.theirs in layers else s.theirs.removeprefix("text_model.")
        assert name in layers and hasattr(layers[name], "base_layer") == (s in wrapped), s.peft


# --- bad input -------------------------------------------------------------------------------------------

def test_sd15_and_base_loras_on_the_wrong_model(tmp_path):
    sd15 = {}
    for name, (i, o) in {"lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),
                         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (768, 640),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}.items():
        sd15 |= {f"{name}.lora_down.weight": torch.zeros(4, i), f"{name}.lora_up.weight": torch.zeros(o, 4),
                 f"{name}.alpha": torch.tensor(4.0)}
    save_file(sd15, tmp_path / "sd15.safetensors")
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() holds the live tensors
    # (SD 1.5's down_blocks.1 attention has SDXL's diffusers name: kohya spellings of diffusers names are read too)
    with pytest.raises(SDXLError, match=r"sd15.safetensors: an adapter for SD 1.x, not this sdxl-custom model "
                                        r"\(modules such as lora_unet_down_blocks_0_attentions_0_proj_in\)"):
        load_lora(model, tmp_path / "sd15.safetensors")
    # a base LoRA (CLIP-L weights) on the refiner
    path = save_lora(trained(TINY_BASE, DEFAULT_TARGETS), tmp_path / "base.safetensors")
    with pytest.raises(SDXLError, match=r"an adapter for the SDXL base \(it has CLIP-L modules; this model has no "
                                        r"CLIP-L\), not this sdxl-custom model \(modules such as lora_te1_text_model_encoder_layers_0"):
        load_lora(fresh(TINY_REFINER), path)
    # right names, wrong shapes: the CLIP-L (768 wide) part of an SD 1.5 LoRA
    save_file({k: v for k, v in sd15.items() if k.startswith("lora_te_")}, tmp_path / "te.safetensors")
    with pytest.raises(SDXLError, match=r"1 bad adapter module: lora_te_text_model_encoder_layers_0_self_attn_q_proj: "
                                        r"down \(4, 768\) up \(768, 4\) for a weight \(128, 128\)"):
        load_lora(model, tmp_path / "te.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _nan_in_last_module(sd: dict) -> dict:
    k = sorted(sd)[-2]  # the last module, so that earlier ones would already be merged by a careless loader
    bad = dict(sd)
    bad[k] = sd[k].clone()
    bad[k].view(-1)[0] = float("nan")
    return bad


@pytest.mark.parametrize("damage,message", [
    (_nan_in_last_module, "non-finite"),
    (lambda sd: {**sd, "lora_unet_middle_block_1_proj_in.alpha": torch.tensor(float("inf"))},
     "lora_unet_middle_block_1_proj_in: non-finite"),
    (lambda sd: {k: v for k, v in sd.items() if k != "lora_unet_middle_block_1_proj_in.lora_up.weight"},
     "lora_unet_middle_block_1_proj_in lacks lora_up"),
    (lambda sd: {"lora_unet_middle_block_1_proj_in.hada_w1_a": torch.zeros(4, 4)},
     "1 bad adapter module: lora_unet_middle_block_1_proj_in lacks hada_w1_b"),
    (lambda sd: {"x": torch.zeros(1)}, r"1 tensor whose name matches no adapter weights \(x\); supported: lora, loha, lokr"),
], ids=["nan", "inf-alpha", "no-up", "loha", "other"])
def test_non_finite_and_incomplete_loras_change_nothing(tmp_path, damage, message):
    sd = lora_state_dict(trained(TINY_BASE, DEFAULT_TARGETS))
    save_file(damage(sd), tmp_path / "bad.safetensors")
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() holds the live tensors
    with pytest.raises(SDXLError, match=message):
        load_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickled_lora_refused_never_unpickled(tmp_path, kind):
    marker, path = tmp_path / "unpickled", tmp_path / "lora.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"boom": Boom(str(marker))}, protocol=4))
    else:
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2), "boom": Boom(str(marker))}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_lora(fresh(), path)
    assert not marker.exists()


def test_saving_never_overwrites(tmp_path):
    model = trained(TINY_BASE, DEFAULT_TARGETS)
    path = save_lora(model, tmp_path / "l.safetensors", metadata={"ss_output_name": "mine", "epochs": 3})
    data = path.read_bytes()
    assert ck.SafetensorsFile(path).metadata["epochs"] == "3"
    for fmt in ("kohya", "peft"):
        with pytest.raises(SDXLError, match="already exists"):
            save_lora(model, path, format=fmt)
    assert path.read_bytes() == data
    save_lora(model, tmp_path, format="peft")
    with pytest.raises(SDXLError, match="already exists"):
        save_lora(model, tmp_path, format="peft")
    with pytest.raises(SDXLError, match="is a folder"):
        save_lora(model, tmp_path, format="kohya")
    with pytest.raises(SDXLError, match="no LoRA layers"):
        save_lora(fresh(), tmp_path / "empty.safetensors")
    with pytest.raises(SDXLError, match="unknown LoRA format"):
        save_lora(model, tmp_path / "x.safetensors", format="lycoris")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors", PEFT_FILE]
