"""Textual-inversion embeddings: the file forms SDXL users have (and the refused ones, with their message), the
name in a prompt standing for its vectors in both encoders (weights, windows), parity with diffusers'
`load_textual_inversion` on a tiny random model (fp32, CPU; prompt embeddings and pooled within 1e-5)."""

import json

import pytest
import torch
from conftest import randomize
from PIL import Image
from safetensors.torch import save_file

from sdxl.adapters.embeddings import (EmbeddingError, Embeddings, checkpoint_widths, load_embedding, load_folder,
                                     recorded_hashes)
from sdxl.models.model import TINY_BASE, SDXLModel
from sdxl.models.prompts import apply_weights, tokenize
from sdxl.models.tokenizer import PAD_BIGG, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-5, atol=1e-5)
W = (128, 128)  # the tiny model's CLIP-L and bigG token widths
TOK = Tokenizer.default()


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


def write(path, tensors: dict, metadata: dict | None = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def sdxl_file(path, n: int = 3, seed: int = 0):
    return write(path, {"clip_l": vectors(n, W[0], seed), "clip_g": vectors(n, W[1], seed + 1)})


def tokenizer_with(*embeddings) -> Tokenizer:
    return TOK.with_embeddings(Embeddings({e.name: e for e in embeddings}, {}))


# --- files ----------------------------------------------------------------------------------------------------------

def test_the_sdxl_form_loads_with_its_metadata(tmp_path):
    p = write(tmp_path / "myemb.safetensors", {"clip_l": vectors(3, 128, 0), "clip_g": vectors(3, 128, 1)},
              {"step": "1500", "sd_checkpoint": "abc123", "sd_checkpoint_name": "sdxl_base"})
    e = load_embedding(p, W)
    assert (e.name, e.vectors, e.shape, e.step) == ("myemb", 3, 256, 1500)
    assert e.as_dict() == {"step": 1500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "sdxl_base",
                           "shape": 256, "vectors": 3}
    torch.testing.assert_close(e.clip_g, vectors(3, 128, 1), rtol=0, atol=0)


def test_one_dimensional_tensors_are_one_vector(tmp_path):
    e = load_embedding(write(tmp_path / "one.safetensors", {"clip_l": vectors(1, 128, 0)[0],
                                                            "clip_g": vectors(1, 128, 1)[0]}), W)
    assert e.clip_l.shape == (1, 128) and e.clip_g.shape == (1, 128)


def test_a_diffusers_pair_is_one_embedding(tmp_path):
    write(tmp_path / "toy.safetensors", {"<cat-toy>": vectors(2, 128, 0)})
    write(tmp_path / "toy_2.safetensors", {"<cat-toy>": vectors(2, 128, 1)})
    sdxl_file(tmp_path / "other_2.safetensors")  # an embedding named "other_2", not half of a pair
    found = load_folder(tmp_path, W)
    assert sorted(found.loaded) == ["other_2", "toy"] and not found.skipped
    torch.testing.assert_close(found.loaded["toy"].clip_g, vectors(2, 128, 1), rtol=0, atol=0)


@pytest.mark.parametrize("name, tensors, message", [
    ("sd15.safetensors", {"emb_params": vectors(2, 768, 0)}, "an SD 1.x embedding (one 768-wide tensor"),
    ("sd21.safetensors", {"<tok>": vectors(1, 1024, 0)}, "an SD 2.x embedding (one 1024-wide tensor"),
    ("half.safetensors", {"<tok>": vectors(1, 128, 0)}, "half"),
    ("big.safetensors", {"clip_l": vectors(2, 768, 0), "clip_g": vectors(2, 1280, 0)},
     "vectors 768 (clip_l) and 1280 (clip_g) wide, but this model's encoders take 128 and 128"),
    ("uneven.safetensors", {"clip_l": vectors(2, 128, 0), "clip_g": vectors(3, 128, 0)},
     "2 clip_l and 3 clip_g vectors"),
    ("long.safetensors", {"clip_l": vectors(76, 128, 0), "clip_g": vectors(76, 128, 0)}, "from 1 to 75"),
    ("nan.safetensors", {"clip_l": torch.full((1, 128), float("nan")), "clip_g": vectors(1, 128, 0)}, "non-finite"),
    ("lora.safetensors", {"a": vectors(1, 128, 0), "b": vectors(1, 128, 0)}, "not clip_l and clip_g"),
    ("image.safetensors", {"clip_l": torch.zeros(1, 2, 128), "clip_g": torch.zeros(1, 128)},
     "holds 2 tensors (clip_g [1, 128], clip_l [1, 2, 128]); a textual-inversion embedding for this model holds "
     "clip_l (n, 128) and clip_g (n, 128), n from 1 to 75"),
    ("empty.safetensors", {"clip_l": torch.zeros(0, 128), "clip_g": torch.zeros(0, 128)}, "clip_l (n, 128) and"),
    ("huge.safetensors", {"clip_l": torch.full((1, 128), 1e30), "clip_g": vectors(1, 128, 0)},
     "holds values up to 1e+30, beyond +-1000"),
    ("junk.safetensors", {"clip_l": vectors(1, 128, 0), "clip_g": vectors(1, 128, 1), "junk": vectors(1, 4, 0)},
     "holds junk besides clip_l and clip_g"),
    ("BREAK.safetensors", {"clip_l": vectors(1, 128, 0), "clip_g": vectors(1, 128, 1)},
     "the prompt parser reads the name 'BREAK' as syntax"),
    ("(style).safetensors", {"clip_l": vectors(1, 128, 0), "clip_g": vectors(1, 128, 1)}, "'(style)' as syntax"),
])
def test_refused_files_say_what_they_are(tmp_path, name, tensors, message):
    write(tmp_path / name, tensors)
    found = load_folder(tmp_path, W)
    assert not found.loaded
    assert message in found.skipped[name.removesuffix(".safetensors")]


def test_pickles_are_refused_unread(tmp_path):
    (tmp_path / "easynegative.pt").write_bytes(b"\x80\x04this would be unpickled")
    (tmp_path / "badhands.bin").write_bytes(b"PK\x03\x04 a zip pickle")
    sdxl_file(tmp_path / "fine.safetensors")
    found = load_folder(tmp_path, W)
    assert list(found.loaded) == ["fine"]
    assert "pickle, never loaded" in found.skipped["easynegative"] and "pickle" in found.skipped["badhands"]


def test_names_are_whole_words_ignoring_case_and_the_embedding_wins(tmp_path):
    red = load_embedding(sdxl_file(tmp_path / "red.safetensors", 1), W)
    neg = load_embedding(sdxl_file(tmp_path / "neg.safetensors", 2), W)
    neg2 = load_embedding(sdxl_file(tmp_path / "neg_v2.safetensors", 2), W)
    db = Embeddings({"red": red, "neg": neg, "neg_v2": neg2}, {})
    assert db.split("a RED reduced (red:1.2) neg_v2,neg redneg") == ["a ", red, " reduced (", red, ":1.2) ", neg2,
                                                                     ",", neg, " redneg"]
    assert db.used(["neg_v2 red", None, "red, neg"]) == [neg2, red, neg]
    assert db.infotext(["a cat", "neg"]) == f"neg: {neg.hash}" and len(neg.hash) == 12
    assert db.infotext(["a cat"]) is None


def test_values_up_to_the_limit_load(tmp_path):
    e = load_embedding(write(tmp_path / "loud.safetensors", {"clip_l": torch.full((1, 128), -1000.0),
                                                             "clip_g": vectors(1, 128, 1)}), W)
    assert e.clip_l.min().item() == -1000.0


def test_only_embeddings_the_parsed_prompts_use_are_recorded(tmp_path):
    sdxl_file(tmp_path / "myemb.safetensors", 1)
    sdxl_file(tmp_path / "BREAK.safetensors", 1)
    sdxl_file(tmp_path / "müde.safetensors", 1)
    db = load_folder(tmp_path, W)
    assert sorted(db.loaded) == ["myemb", "müde"] and "syntax" in db.skipped["BREAK"]
    mine, tired = db.loaded["myemb"], db.loaded["müde"]
    assert db.infotext(["a cat BREAK a dog", "a break"]) is None  # BREAK is the window break, never an embedding
    assert db.infotext(["(myemb:1.2) BREAK [müde]"]) == f"myemb: {mine.hash}, müde: {tired.hash}"
    assert db.used([r"\(myemb\)", None]) == [mine]


def test_a_prompt_naming_a_refused_file_is_an_error_naming_it(tmp_path):
    write(tmp_path / "nanemb.safetensors", {"clip_l": torch.full((1, 128), float("nan")), "clip_g": vectors(1, 128, 0)})
    write(tmp_path / "sd15.safetensors", {"emb_params": vectors(2, 768, 0)})
    sdxl_file(tmp_path / "finemb.safetensors")
    sdxl_file(tmp_path / "BREAK.safetensors")
    db = load_folder(tmp_path, W)
    for texts in (["a blue nanemb star"], ["a star", "(NanEmb:1.2), blurry"], ["a star", None, "x nanemb"]):
        with pytest.raises(EmbeddingError, match=r"names the embedding '(?i:nanemb)', which was refused: .*"
                                                 r"nanemb\.safetensors: holds non-finite values"):
            db.check(texts)
    with pytest.raises(EmbeddingError, match="sd15.safetensors: an SD 1.x embedding"):
        db.check(["finemb, sd15"])
    db.check(["a finemb star BREAK nanembs, sd15_v2 and a break"])  # other words, and BREAK: no error


def test_an_embedding_named_like_a_word_warns_once(tmp_path, recwarn):
    sdxl_file(tmp_path / "white.safetensors", 1)
    sdxl_file(tmp_path / "mystyle.safetensors", 1)
    db = load_folder(tmp_path, W)
    db.check(["a white cat on a white mat, mystyle", "white"])
    assert [str(w.message) for w in recwarn] == [f"the prompt word 'white' is taken as the embedding "
                                                 f"{tmp_path / 'white.safetensors'}, not as the word (as A1111 "
                                                 "does); rename the file to use the word"]


def test_recorded_ti_hashes_are_read_from_the_infotext():
    text = ('a mystyle cat\nNegative prompt: x\n'
            'Steps: 2, TI hashes: "mystyle: 0123456789ab, müde: ba9876543210", Seed: 1')
    assert recorded_hashes(text) == {"mystyle": "0123456789ab", "müde": "ba9876543210"}
    assert recorded_hashes('Steps: 2, TI hashes: "m\\u00fcde: 0123456789ab"') == {"müde": "0123456789ab"}
    assert recorded_hashes("TI hashes: x: 1\nSteps: 2") == {}  # in the prompt, not the settings line


# --- prompts --------------------------------------------------------------------------------------------------------

def test_an_embedding_is_never_split_across_windows(tmp_path):
    e = load_embedding(sdxl_file(tmp_path / "myemb.safetensors", 3), W)
    tok = tokenizer_with(e)
    words = " ".join(["cat"] * 73)  # 73 tokens: 2 left in the first window, too few for 3 vectors
    w = tokenize(f"{words} (myemb:1.5) dog", tok, PAD_BIGG)
    assert w.ids.shape == (2, 77) and w.fixes == ((1, 1, e),)
    assert w.ids[0, 74].item() == 49407 and w.ids[1, 1:4].tolist() == [0, 0, 0]  # window 0 ends after 73 tokens
    assert w.weights[1, 1:5].tolist() == [1.5, 1.5, 1.5, 1.0]
    fits = tokenize(" ".join(["cat"] * 72) + " myemb", tok, PAD_BIGG)  # exactly fills the first window
    assert fits.ids.shape == (1, 77) and fits.fixes == ((0, 73, e),)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Our tiny base conditioner and diffusers' SDXL pipeline around the same weights, an embedding of 3 vectors
    loaded into diffusers' two tokenizers and text encoders under its name (diffusers' documented SDXL recipe)."""
    from diffusers import StableDiffusionXLPipeline

    from sdxl.formats import checkpoint as ck

    torch.manual_seed(0)
    model = randomize(SDXLModel(TINY_BASE), 0, 0.05)
    d = tmp_path_factory.mktemp("ti")
    ck.save_diffusers(model, d / "base")
    e = load_embedding(sdxl_file(d / "myemb.safetensors", 3, seed=5), W)
    theirs = StableDiffusionXLPipeline.from_pretrained(d / "base")
    theirs.load_textual_inversion(e.clip_l, token="myemb", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(e.clip_g, token="myemb", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    return model.conditioner.eval(), theirs, e


@pytest.mark.parametrize("prompt", ["a photo of myemb in the snow", "myemb", "myemb, myemb and a cat"])
def test_prompt_embeddings_match_diffusers_load_textual_inversion(tiny, prompt):
    ours, theirs, e = tiny
    with torch.no_grad():
        x, pooled = ours.encode_prompt(prompt, None, tokenizer_with(e))
        ref, _, ref_pooled, _ = theirs.encode_prompt(prompt, do_classifier_free_guidance=False)
    torch.testing.assert_close(x, ref, **TOL)
    torch.testing.assert_close(pooled, ref_pooled, **TOL)
    with torch.no_grad():
        plain, _ = ours.encode_prompt(prompt, None, TOK)
    assert (x - plain).abs().max() > 1e-3  # the vectors changed the result


def test_a_weighted_embedding_is_diffusers_embedding_with_a1111_emphasis(tiny):
    ours, theirs, e = tiny
    with torch.no_grad():
        x, _ = ours.encode_prompt("a photo of (myemb:1.3) in the snow", None, tokenizer_with(e))
        ref, _, _, _ = theirs.encode_prompt("a photo of myemb in the snow", do_classifier_free_guidance=False)
    weights = torch.ones(77)
    weights[4:7] = 1.3  # BOS, a, photo, of, then the 3 vectors
    want = torch.cat([apply_weights(ref[..., :128], weights), apply_weights(ref[..., 128:], weights)], dim=-1)
    torch.testing.assert_close(x, want, **TOL)


def test_a_negative_prompt_uses_embeddings_too(tiny):
    ours, theirs, e = tiny
    with torch.no_grad():
        _, uncond = ours.guided(tokenizer_with(e), [("a cat", None)], _micro(), [("myemb, blurry", None)], _micro())
        _, ref, _, _ = theirs.encode_prompt("a cat", negative_prompt="myemb, blurry", do_classifier_free_guidance=True)
    torch.testing.assert_close(uncond.crossattn, ref, **TOL)


def test_the_refiner_gets_the_bigg_vectors(tiny):
    from sdxl.models.conditioning import Conditioner
    from sdxl.models.model import TINY_REFINER

    ours, _, e = tiny
    refiner = Conditioner.from_parts(TINY_REFINER.conditioner, ours.bigg)  # the base's bigG, without CLIP-L
    with torch.no_grad():
        x, pooled = ours.encode_prompt("(myemb:1.2) on a table", None, tokenizer_with(e))
        x_g, pooled_g = refiner.encode_prompt("(myemb:1.2) on a table", None, tokenizer_with(e))
    torch.testing.assert_close(x_g, x[..., 128:], rtol=0, atol=0)
    torch.testing.assert_close(pooled_g, pooled, rtol=0, atol=0)


def test_checkpoint_widths_from_a_header_or_a_diffusers_folder(tiny, tmp_path):
    from conftest import tiny_checkpoints

    assert checkpoint_widths(tiny[2].path.parent / "base") == W
    assert checkpoint_widths(tiny_checkpoints(tmp_path)[0]) == W


def test_vectors_take_the_encoders_dtype(tiny):
    import copy

    ours, _, e = tiny
    half = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        x, _ = ours.encode_prompt("a myemb", None, tokenizer_with(e))
        x16, _ = half.encode_prompt("a myemb", None, tokenizer_with(e))
    assert x16.dtype == torch.bfloat16
    torch.testing.assert_close(x16.float(), x, rtol=0.05, atol=0.05)


def _micro() -> dict:
    from sdxl.models.conditioning import micro_values

    return micro_values(64, 64)


# --- CLI and server -------------------------------------------------------------------------------------------------

def _infotext(path) -> str:
    with Image.open(path) as im:
        return im.info["parameters"]


def test_cli_embeddings_dir_uses_them_and_records_their_hashes(tmp_path, capsys):
    from conftest import FAST, run, tiny_checkpoints

    from sdxl.formats.png import file_hash

    base, _ = tiny_checkpoints(tmp_path)
    folder = tmp_path / "emb"
    folder.mkdir()
    emb = sdxl_file(folder / "myemb.safetensors", 3)
    (folder / "old.pt").write_bytes(b"\x80\x04pickled")
    args = ["--model", base, "--seed", 3, *FAST]
    code, out, _ = run(capsys, "generate", "a (myemb:1.2) cat", "--negative", "blurry", "--embeddings-dir", folder,
                       "-o", tmp_path / "with.png", *args)
    assert code == 0 and "embedding old skipped" in out and "pickle" in out
    assert f'TI hashes: "myemb: {file_hash(emb)[:12]}"' in _infotext(tmp_path / "with.png")
    assert run(capsys, "generate", "a (myemb:1.2) cat", "--negative", "blurry", "-o", tmp_path / "without.png",
               *args)[0] == 0
    assert "TI hashes" not in _infotext(tmp_path / "without.png")
    with Image.open(tmp_path / "with.png") as a, Image.open(tmp_path / "without.png") as b:
        assert a.tobytes() != b.tobytes()
    code, _, err = run(capsys, "generate", "a cat", "--embeddings-dir", tmp_path / "nowhere", *args)
    assert code == 2 and "--embeddings-dir" in err and "not a folder" in err
    code, _, err = run(capsys, "generate", "--from-png", tmp_path / "with.png", "-o", tmp_path / "again.png")
    assert code == 2 and "made with textual-inversion embeddings (myemb); give the folder that holds them with " \
                         "--embeddings-dir DIR" in err
    code, _, _ = run(capsys, "generate", "--from-png", tmp_path / "with.png", "--embeddings-dir", folder,
                     "--no-watermark", "-o", tmp_path / "again.png")
    with Image.open(tmp_path / "with.png") as a, Image.open(tmp_path / "again.png") as b:
        assert code == 0 and a.tobytes() == b.tobytes()


def test_cli_replay_needs_every_recorded_embedding_and_refused_names_are_errors(tmp_path, capsys):
    from conftest import FAST, run, tiny_checkpoints

    base, _ = tiny_checkpoints(tmp_path)
    good, empty, changed, broken = (tmp_path / n for n in ("good", "empty", "changed", "broken"))
    for folder in (good, empty, changed, broken):
        folder.mkdir()
    mine, tired = sdxl_file(good / "myemb.safetensors", 2), sdxl_file(good / "müde.safetensors", 1, seed=3)
    sdxl_file(good / "unused.safetensors", 1, seed=4)  # in the folder, not in the prompt: not recorded
    sdxl_file(changed / "myemb.safetensors", 2, seed=9)
    sdxl_file(changed / "müde.safetensors", 1, seed=3)
    write(broken / "myemb.safetensors", {"clip_l": torch.full((2, 128), 1e30), "clip_g": vectors(2, 128, 0)})
    png = tmp_path / "made.png"
    code, _, _ = run(capsys, "generate", "a (myemb:1.2) müde cat", "--embeddings-dir", good, "--model", base,
                     "--seed", 3, "-o", png, *FAST)
    assert code == 0
    hashes = f"myemb: {load_embedding(mine, W).hash}, müde: {load_embedding(tired, W).hash}"
    assert f'TI hashes: "{hashes}"' in _infotext(png)
    again = ["generate", "--from-png", png, "--no-watermark", "-q"]
    code, _, err = run(capsys, *again, "--embeddings-dir", empty, "-o", tmp_path / "e.png")
    assert code == 2 and f"--embeddings-dir {empty} does not load (myemb: not in the folder; müde: not in the " \
                         "folder); give the folder that holds them with --embeddings-dir DIR" in err
    code, _, err = run(capsys, *again, "--embeddings-dir", broken, "-o", tmp_path / "b.png")
    assert code == 2 and f"(myemb: {broken / 'myemb.safetensors'}: holds values up to 1e+30" in err
    with pytest.warns(UserWarning) as caught:
        code, _, _ = run(capsys, *again, "--embeddings-dir", changed, "-o", tmp_path / "c.png")
    have = load_embedding(changed / "myemb.safetensors", W).hash
    assert code == 0 and [str(w.message) for w in caught] == [
        f"embedding myemb {changed / 'myemb.safetensors'} has hash {have} but {png} was made with hash "
        f"{load_embedding(mine, W).hash}; the image will differ"]
    for flags in (["a blue myemb star"], ["a star", "--negative", "(myemb:1.1), blurry"],
                  ["a star", "--prompt-2", "myemb"], ["a star", "--negative-2", "myemb"]):
        code, _, err = run(capsys, "generate", *flags, "--embeddings-dir", broken, "--model", base, "-o",
                           tmp_path / "x.png", *FAST)
        assert code == 2 and f"names the embedding 'myemb', which was refused: {broken / 'myemb.safetensors'}: " \
                             "holds values up to 1e+30" in err, flags
    assert not (tmp_path / "x.png").exists()


def test_server_lists_and_applies_the_models_folder_embeddings(tmp_path):
    import httpx
    from serve_fixtures import FAST, live_server, make_models_folder

    root = make_models_folder(tmp_path / "models")
    (root / "embeddings" / "sub").mkdir(parents=True)
    emb = load_embedding(write(root / "embeddings" / "sub" / "myemb.safetensors",
                               {"clip_l": vectors(2, 128, 0), "clip_g": vectors(2, 128, 1)}, {"step": "700"}), W)
    write(root / "embeddings" / "sd15.safetensors", {"emb_params": vectors(1, 768, 0)})
    (root / "embeddings" / "old.bin").write_bytes(b"PK\x03\x04")
    with live_server(tmp_path / "out", root) as live:
        listing = httpx.get(f"{live.url}/sdapi/v1/embeddings").json()
        body = {"prompt": "a myemb cat", "seed": 2, **FAST}
        with_emb = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=body, timeout=300).json()
        (pipe, _), = live.app.state.models.loaded.values()
        assert list(pipe.tokenizer.embeddings.loaded) == ["myemb"]  # what the job's prompts were encoded with
        assert httpx.post(f"{live.url}/sdapi/v1/refresh-embeddings").status_code == 200
        refused = [httpx.post(f"{live.url}/sdapi/v1/txt2img", json={**body, **extra}, timeout=300)
                   for extra in ({"prompt": "a sd15 cat"}, {"negative_prompt": "(sd15:1.2)"})]
    assert listing["loaded"] == {"myemb": {"step": 700, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": 256, "vectors": 2}}
    assert set(listing["skipped"]) == {"sd15", "old"}
    for r in refused:
        assert r.status_code == 422 and "names the embedding 'sd15', which was refused" in r.text \
            and "an SD 1.x embedding" in r.text, r.text
    assert "SD 1.x" in listing["skipped"]["sd15"]["reason"] and "pickle" in listing["skipped"]["old"]["reason"]
    info = json.loads(with_emb["info"])
    assert f'TI hashes: "myemb: {emb.hash}"' in info["infotexts"][0]


def test_lora_tags_are_not_embedding_names(tmp_path):
    from types import SimpleNamespace

    from conftest import tiny_checkpoints

    from sdxl.session import check_embeddings, resolve_models

    base, _ = tiny_checkpoints(tmp_path)
    (tmp_path / "emb").mkdir()
    write(tmp_path / "emb" / "style.safetensors", {"emb_params": vectors(2, 768, 0)})  # refused: SD 1.x
    models = resolve_models(base, None, True, embeddings=str(tmp_path / "emb"))
    req = SimpleNamespace(prompt="a cat <lora:style:0.8>", negative_prompt="", prompt_2=None, negative_prompt_2=None)
    check_embeddings(req, models)  # the tag names a LoRA: no error
    with pytest.raises(EmbeddingError, match="names the embedding 'style', which was refused: .*SD 1.x"):
        check_embeddings(SimpleNamespace(**vars(req) | {"prompt": ("a style cat", "a dog")}), models)
