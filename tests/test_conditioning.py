"""The Conditioner: one rule for the empty prompt (zeros on the base, "" on the refiner), pooled ++ micro order,
one prompt per batch row. Inference (`Pipeline.conditioning`) and training (`Conditioner.forward` on dropped
captions) go through it, so they agree. Tiny random encoders, fp32, CPU."""

import pytest
import torch
from conftest import randomize

from sdxl.errors import SDXLError
from sdxl.models.conditioning import Conditioner, micro_values
from sdxl.models.model import TINY_BASE, TINY_REFINER
from sdxl.models.tokenizer import Tokenizer
from sdxl.models.unet import timestep_embedding
from sdxl.pipeline import Pipeline
from sdxl.request import Request

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = Tokenizer.default()
LONG = " ".join(["a red circle and a blue square"] * 14)  # about 98 tokens: two windows


@pytest.fixture(scope="module", params=["base", "refiner"])
def conditioner(request) -> Conditioner:
    cfg = (TINY_BASE if request.param == "base" else TINY_REFINER).conditioner
    return randomize(Conditioner(cfg, dtype=torch.float32), seed=3, scale=0.05).eval()


def micro(cond: Conditioner, h: int = 32, w: int = 48) -> dict:
    return micro_values(h, w, original_size=(64, 96), crop=(4, 8), aesthetic_score=2.5)


def test_micro_values_default_to_the_output_size_and_no_crop():
    assert micro_values(32, 48) == {"original_size": (32, 48), "crop_coords_top_left": (0, 0),
                                    "target_size": (32, 48), "aesthetic_score": 6.0}


def test_vector_is_pooled_then_fourier_features_in_config_order(conditioner):
    x, pooled = conditioner.encode_captions(["a red circle"], TOK)
    c = conditioner(x, pooled, micro(conditioner))
    values = {"original_size": [64.0, 96.0], "crop_coords_top_left": [4.0, 8.0], "target_size": [32.0, 48.0],
              "aesthetic_score": [2.5]}
    fourier = [timestep_embedding(torch.tensor(values[name]), 256).reshape(1, -1) for name in conditioner.cfg.micro]
    torch.testing.assert_close(c.vector, torch.cat([pooled, *fourier], dim=-1), rtol=0, atol=0)
    assert torch.equal(c.crossattn, x)


def test_empty_negative_prompt_is_the_dropped_caption(conditioner):
    """The unconditional branch at inference equals what training feeds for a dropped caption."""
    x, pooled = conditioner.encode_captions(["a red circle"], TOK)
    cond, uncond = conditioner.guided(TOK, [("a red circle", None)], micro(conditioner), [("", None)],
                                      micro(conditioner))
    torch.testing.assert_close(cond.crossattn, x, rtol=0, atol=1e-6)
    empty_x, empty_p = conditioner.encode_captions([""], TOK)  # training replaces a dropped caption by ""
    dropped = conditioner(empty_x, empty_p, micro(conditioner), empty=torch.tensor([True]))
    torch.testing.assert_close(uncond.crossattn, dropped.crossattn, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond.vector, dropped.vector, rtol=0, atol=1e-6)
    if conditioner.zeroes_empty_text:  # the base: zeros (diffusers force_zeros_for_empty_prompt)
        assert uncond.crossattn.abs().max() == 0 and uncond.vector[:, :pooled.shape[1]].abs().max() == 0
    else:  # the refiner: the encoding of ""
        assert uncond.crossattn.abs().max() > 0


def test_a_non_empty_negative_prompt_is_encoded(conditioner):
    _, uncond = conditioner.guided(TOK, [("a red circle", None)], micro(conditioner), [("blurry", None)],
                                   micro(conditioner))
    x, pooled = conditioner.encode_captions(["blurry"], TOK)
    torch.testing.assert_close(uncond.crossattn, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond.vector[:, :pooled.shape[1]], pooled, rtol=0, atol=1e-6)


def test_one_prompt_per_row_equals_each_prompt_alone(conditioner):
    prompts = [("a red circle", None), ("a blue square", "a blue square, flat")]
    x, pooled = conditioner.encode_prompts(prompts, TOK)
    for row, p in enumerate(prompts):
        x1, p1 = conditioner.encode_prompt(*p, TOK)
        torch.testing.assert_close(x[row:row + 1], x1, rtol=0, atol=0)
        torch.testing.assert_close(pooled[row:row + 1], p1, rtol=0, atol=0)


def test_shorter_prompts_in_a_batch_get_empty_windows(conditioner):
    x, _ = conditioner.encode_prompts([("a red circle", None), (LONG, None)], TOK)
    assert x.shape[:2] == (2, 154)
    padded, _ = conditioner.encode_prompt("a red circle", None, TOK, min_windows=2)
    torch.testing.assert_close(x[:1], padded, rtol=0, atol=0)


def test_a_longer_negative_prompt_pads_the_positive(conditioner):
    cond, uncond = conditioner.guided(TOK, [("a red circle", None)], micro(conditioner), [(LONG, None)],
                                      micro(conditioner))
    assert cond.crossattn.shape == uncond.crossattn.shape == (1, 154, conditioner.cfg.context_dim)


def test_pipeline_takes_one_prompt_per_image_or_one_for_all():
    from sdxl.models.model import SDXLModel

    model = randomize(SDXLModel(TINY_BASE), seed=1, scale=0.05)
    pipe = Pipeline(model, dtype=torch.float32, tokenizer=TOK, channels_last=False)
    req = Request(("a red circle", "a blue square"), width=32, height=32, batch=2)
    cond, uncond = pipe.conditioning(pipe.base, req)
    x, pooled = pipe.base.conditioner.encode_prompts([("a red circle", None), ("a blue square", None)], TOK)
    torch.testing.assert_close(cond.crossattn, x, rtol=0, atol=0)
    assert uncond.crossattn.shape == x.shape and uncond.crossattn.abs().max() == 0
    same, _ = pipe.conditioning(pipe.base, Request("a red circle", width=32, height=32, batch=2))
    torch.testing.assert_close(same.crossattn[1], x[0], rtol=0, atol=0)
    with pytest.raises(SDXLError, match="prompt: 2 prompts for a batch of 3"):
        pipe.conditioning(pipe.base, Request(("a", "b"), width=32, height=32, batch=3))
