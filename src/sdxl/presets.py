"""Presets for few-step SDXL models: the sampler, schedule, steps, CFG scale (and size) their authors publish.

`sdxl generate --preset NAME` fills these settings; flags given explicitly override them. CFG scale 1 turns
guidance off, which is what the authors' `guidance_scale=0` does in diffusers (guidance applies above 1).
A preset's size (turbo's 512x512) is for the SDXL-size model it was published for: it applies only on a model
whose native size is at least 1024 (SDXL's; a smaller model, such as the small default one, keeps its own),
and a --width or --height given replaces it as a whole (the other side is then the model's native size).

| preset | model files | published settings | source |
|---|---|---|---|
| turbo | all-in-one `sd_xl_turbo_1.0.safetensors` | EulerAncestral, trailing, 1 step, guidance off, 512x512 | diffusers docs `using-diffusers/sdxl_turbo` (https://huggingface.co/docs/diffusers/using-diffusers/sdxl_turbo) |
| lightning-4step, lightning-8step | UNet-only `sdxl_lightning_Nstep_unet.safetensors` (`--unet`) or its LoRA | EulerDiscrete, trailing, N steps, guidance off | ByteDance/SDXL-Lightning model card (https://huggingface.co/ByteDance/SDXL-Lightning) |
| hyper-8step | LoRA `Hyper-SDXL-8steps-lora.safetensors` | DDIM, trailing, 8 steps, guidance off | ByteDance/Hyper-SD model card (https://huggingface.co/ByteDance/Hyper-SD, README at 831b863) |
| lcm | LoRA `lcm-lora-sdxl` | LCMScheduler, 4 steps (2-8), guidance off (or 1-2) | latent-consistency/lcm-lora-sdxl model card (https://huggingface.co/latent-consistency/lcm-lora-sdxl) |

The `lcm` preset walks `sgm_uniform` (ComfyUI's schedule for LCM): LCMScheduler's own timesteps, every
(50 / steps)-th of 50 (999, 759, 499, 259 for 4 steps), are close to it (999, 749, 500, 250) but not equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdxl.errors import SDXLError


@dataclass(frozen=True)
class Preset:
    sampler: str
    schedule: str
    steps: int
    cfg: float
    size: int | None = None  # pixels a side; None: the model's native size

    def settings(self, native: int = 1024) -> dict:
        """The Request settings it fills (sampler, schedule, steps, cfg, and width/height with a size, on a model
        whose `native` size, pixels a side, is SDXL's 1024 or more)."""
        s = {"sampler": self.sampler, "schedule": self.schedule, "steps": self.steps, "cfg": self.cfg}
        return s | ({"width": self.size, "height": self.size} if self.size and native >= 1024 else {})


PRESETS = {
    "turbo": Preset("euler_ancestral", "trailing", 1, 1.0, 512),
    "lightning-4step": Preset("euler", "trailing", 4, 1.0),
    "lightning-8step": Preset("euler", "trailing", 8, 1.0),
    "hyper-8step": Preset("ddim", "trailing", 8, 1.0),
    "lcm": Preset("lcm", "sgm_uniform", 4, 1.0),
}


def preset_settings(name: str, native: int = 1024) -> dict:
    """The settings of a named preset on a model of `native` size (`Preset.settings`); an unknown name is an
    SDXLError listing the known ones."""
    if name not in PRESETS:
        raise SDXLError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].settings(native)
