"""Parity of sdxl.models.tokenizer with transformers' CLIPTokenizer (the diffusers SDXL tokenizers)."""

import random

import pytest
import torch

from sdxl.errors import SDXLError
from sdxl.models.tokenizer import BOS, EOS, MAX_LENGTH, PAD_BIGG, PAD_CLIP_L, Tokenizer

HARD = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "ASTRONAUT riding a HoRsE on MARS",
    "(masterpiece:1.2), [blurry], ((best quality)), {detailed}, <lora:foo_v2:0.8>",
    "(((ultra detailed:1.4))), [[[low quality]]] :: 1.5 AND a dog BREAK a cat",
    "score_9, score_8_up, 1girl, solo, looking_at_viewer, hands-on-hips",
    "1024x1024, 3.14, 1,000, 2e-5, -7, +42%, $9.99, 4k 8K 16k, 35mm f/1.8, 1/250s, ISO-100",
    "year 1999-2024, 12:30pm, #hashtag @user http://example.com/a?b=c&d=e",
    "!!!???...,,,;;;:::---___+++===***&&&|||~~~```'''\"\"\"",
    "wow!!! really??? ... -- — – … «quoted» „low“ 'single' \"double\"",
    "it's don't we're they've I'm you'll he'd IT'S DON'T",
    "rock'n'roll o'clock ''s 's 't",
    "tom &amp; jerry &lt;3 &gt; it&#39;s &quot;quoted&quot; &nbsp; &amp;amp; &#x27;",
    "café naïve résumé coöperate Ångström Dvořák Łódź Øresund straße STRASSE ẞ",
    "e\u0301 versus \u00e9, n\u0303 versus \u00f1, a\u030a, q\u0303, x\u0308\u0301",
    "Ελληνικά ΟΔΟΣ σοφός, Русский текст ПРИВЕТ мир, Українська ґ ї, İstanbul ı I",
    "中文提示词 一只猫 高清, 日本語のテキスト カタカナ ひらがな, 한국어 프롬프트",
    "עברית שלום, العربية مرحبا, हिन्दी नमस्ते, ไทย สวัสดี",
    "emoji 😀🎨🐱‍👤 🏳️‍🌈 👍🏽 👩🏿‍🔬 👨‍👩‍👧‍👦 ❤️ ✨ 🇯🇵🇫🇷",
    "🧑🏻‍🎤🧑🏼‍🎤🧑🏽‍🎤🧑🏾‍🎤🧑🏿‍🎤 family: 👩‍❤️‍💋‍👨",
    "full-width ＡＢＣ　ｘｙｚ １２３ ！ and ligatures ﬁne ﬂow Ⅻ ½ ² ™ ©",
    "curly ‘quotes’ and “double” and it’s",
    "mojibake cafÃ© Ã¼ber â€™ â€œ",
    "tabs\tand\nnewlines\r\nand   runs    of     spaces\u00a0nbsp\u2003em\u3000ideo",
    "\t\n  leading and trailing whitespace \n\t ",
    "zero\u200bwidth\u200cjoiners\u200d and\ufeffbom and soft\u00adhyphen",
    "control\x00chars\x07here\x1b[0m\x7f\x1c\x1f",
    "math 𝐀𝐁𝐂 𝓈𝒸𝓇𝒾𝓅𝓉 ∑∫∂ √2 ≠ ≤ ∞ π",
    "<|startoftext|> literal specials <|endoftext|> in the prompt",
    "x<|endoftext|>y <|ENDOFTEXT|> <|EndOfText|>>> ((<|StartOfText|>)) <|endoftext|",
    "a<|startoftext|><|endoftext|>b",
    "</w> <w> <unk> [PAD] [CLS] <s></s>",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "trending on artstation, by greg rutkowski and alphonse mucha, octane render, unreal engine 5",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped",
    " ".join(["word"] * 74),
    " ".join(["word"] * 75),
    " ".join(["word"] * 76),
    " ".join(["word"] * 300),
    ", ".join(["a majestic lion in the savanna at golden hour"] * 12),
    "🐱" * 40,
    "中" * 200,
]

_SUBJECTS = ["a cat", "an astronaut", "a castle", "a portrait of a woman", "a red sports car", "a bowl of ramen",
             "an old fisherman", "a cyberpunk city", "a forest spirit", "a steampunk airship"]
_PLACES = ["on mars", "in the rain", "at night", "under water", "in a misty forest", "on a busy street in Tokyo"]
_STYLES = ["oil painting", "studio ghibli style", "photorealistic", "35mm film photo", "watercolor",
           "low poly 3D render", "ukiyo-e woodblock print", "concept art"]
_EXTRAS = ["highly detailed", "8k", "sharp focus", "bokeh", "volumetric lighting", "HDR", "masterpiece",
           "best quality", "by Greg Rutkowski", "trending on ArtStation", "f/2.8", "85mm", "(dramatic:1.3)",
           "[blurry]", "((intricate))", "café", "Ñandú", "🌸", "It's", "&amp;", "1920x1080"]
_RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
           (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x3000, 0x30FF),
           (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFB00, 0xFB06), (0xFF01, 0xFF5E), (0x1D400, 0x1D4FF),
           (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1F3FB, 0x1F3FF), (0x200D, 0x200D), (0xFE0F, 0xFE0F),
           (0x9, 0xD)]


def _generated(rng: random.Random) -> list[str]:
    prompts = []
    for _ in range(120):  # typical prompts, mixed case, weights and noise
        parts = [rng.choice(_SUBJECTS), rng.choice(_PLACES), rng.choice(_STYLES), *rng.sample(_EXTRAS, rng.randint(0, 8))]
        text = ", ".join(parts)
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        prompts.append(text * rng.choice([1, 1, 1, 3]))
    for _ in range(80):  # random code points from many scripts, emoji, marks, spaces
        prompts.append("".join(chr(rng.randint(*rng.choice(_RANGES))) for _ in range(rng.randint(1, 60))))
    return prompts


CORPUS = HARD + _generated(random.Random(0))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    tok.write_files(directory)
    return directory


def _reference(directory, **kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(directory, **kwargs)


def test_corpus_size():
    assert len(CORPUS) >= 200


def test_vocabulary(tok):
    assert len(tok) == 49_408
    assert tok.vocab["<|startoftext|>"] == BOS == 49406 and tok.vocab["<|endoftext|>"] == EOS == 49407
    assert tok.vocab["!"] == PAD_BIGG == 0 and PAD_CLIP_L == EOS and MAX_LENGTH == 77
    assert Tokenizer.default() is tok


def _mismatches(got: torch.Tensor, expected: torch.Tensor, texts: list[str]) -> list[str]:
    assert got.dtype == torch.long and got.shape == expected.shape == (len(texts), 77)
    return [texts[i] for i in (got != expected).any(1).nonzero().flatten().tolist()]


def test_parity_clip_l(tok, hf_dir):
    ref = _reference(hf_dir, pad_token="<|endoftext|>")
    expected = ref(CORPUS, max_length=77, truncation=True, padding="max_length", return_tensors="pt").input_ids
    bad = _mismatches(tok(CORPUS, pad=PAD_CLIP_L), expected, CORPUS)
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_parity_bigg(tok, hf_dir):
    # diffusers' tokenizer_2 registers its pad "!" as a special token, so it also cuts every "!" out of
    # the prompt as id 0 ("wow!!!" -> wow, 0, 0, 0); open_clip, which bigG was trained with, BPEs it
    # like any punctuation ("!!!</w>"). We follow open_clip: the ids never depend on the padding.
    ref = _reference(hf_dir, pad_token="!")
    assert ref.pad_token_id == PAD_BIGG
    plain = [t for t in CORPUS if "!" not in t]
    expected = ref(plain, max_length=77, truncation=True, padding="max_length", return_tensors="pt").input_ids
    bad = _mismatches(tok(plain, pad=PAD_BIGG), expected, plain)
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"
    assert ref("wow!!!", add_special_tokens=False).input_ids == [*tok.ids("wow"), 0, 0, 0]
    assert tok.ids("wow!!!") == tok.ids("wow") + [tok.vocab["!!!</w>"]]

    # the whole corpus, "!" included: open_clip's layout is the CLIP-L ids with 0 after the EOS
    enc = _reference(hf_dir)(CORPUS, max_length=77, truncation=True, padding="max_length", return_tensors="pt")
    expected = enc.input_ids.masked_fill(enc.attention_mask == 0, PAD_BIGG)
    bad = _mismatches(tok(CORPUS, pad=PAD_BIGG), expected, CORPUS)
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_ids_parity_untruncated(tok, hf_dir):
    expected = _reference(hf_dir)(CORPUS, add_special_tokens=False).input_ids
    assert [tok.ids(t) for t in CORPUS] == expected


def test_long_prompt_ids_not_truncated(tok):
    text = " ".join(["word"] * 300)
    ids = tok.ids(text)
    assert len(ids) == 300 and BOS not in ids and EOS not in ids
    row = tok(text, pad=PAD_BIGG)[0].tolist()
    assert row == [BOS, *ids[:75], EOS]


@pytest.mark.parametrize("pad", [PAD_CLIP_L, PAD_BIGG])
def test_bos_eos_and_padding(tok, pad):
    ids = tok.ids("a photo of a cat")
    assert len(ids) == 5
    batch = tok(["a photo of a cat", ""], pad=pad)
    assert batch.shape == (2, 77)
    assert batch[0].tolist() == [BOS, *ids, EOS] + [pad] * 70
    assert batch[1].tolist() == [BOS, EOS] + [pad] * 75
    assert tok("a photo of a cat", pad=pad).shape == (1, 77)
    assert tok([], pad=pad).shape == (0, 77)


def test_exactly_full_prompt(tok):
    text = " ".join(["word"] * 75)
    row = tok(text, pad=PAD_BIGG)[0]
    assert row[0] == BOS and row[-1] == EOS and (row[1:-1] != EOS).all()


def test_write_files_round_trip(tok, hf_dir):
    loaded = Tokenizer.from_files(hf_dir / "vocab.json", hf_dir / "merges.txt")
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    assert [loaded.ids(t) for t in CORPUS] == [tok.ids(t) for t in CORPUS]
    assert torch.equal(loaded(CORPUS, pad=PAD_BIGG), tok(CORPUS, pad=PAD_BIGG))


def test_rejects_other_vocabulary(tok):
    with pytest.raises(SDXLError, match="49408"):
        Tokenizer({"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, [])


# --- prompts: A1111's weights and windows (sdxl.models.prompts) ----------------------------------

@pytest.mark.parametrize("text,runs", [
    ("a (red:1.2.3) cat", [("a (red:1.2.3) cat", 1.0)]),  # a malformed weight stays literal text
    ("(x (red:1.2.3))", [("x (red:1.2.3)", 1.1)]),  # ... inside brackets that still count
    ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]),
])
def test_prompt_weights(text, runs):
    from sdxl.models.prompts import parse_weights

    assert [(t, pytest.approx(w)) for t, w in parse_weights(text)] == runs


@pytest.mark.parametrize("text,windows", [("a cat BREAK", 1), ("a cat", 1), ("BREAK", 1), ("a BREAK b", 2),
                                          ("a BREAK BREAK b", 3), (" ".join(["word"] * 75), 1),
                                          (" ".join(["word"] * 76), 2)])
def test_prompt_windows_as_a1111(tok, text, windows):
    """A1111's tokenize_line: a trailing BREAK adds no empty window; a full window closes only when more follows."""
    from sdxl.models.prompts import tokenize

    got = tokenize(text, tok, PAD_BIGG)
    assert got.ids.shape == (windows, 77)
    if text == "a cat BREAK":
        assert torch.equal(got.ids, tokenize("a cat", tok, PAD_BIGG).ids)


@pytest.mark.parametrize("text", ["(red:1e400)", "(red:inf)", "(red:nan)", "(red:-1e38)"])
def test_a_weight_a1111_would_not_read_stays_literal(text):
    """A1111's parser takes `[+-]?[.\\d]+` as a weight; anything else (exponents, inf, nan) is text at 1.1."""
    from sdxl.models.prompts import parse_weights

    assert [(t, pytest.approx(w)) for t, w in parse_weights(text)] == [(text[1:-1], 1.1)]
