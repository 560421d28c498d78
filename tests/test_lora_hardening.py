"""LoRA input hardening (issue 14, tester report): one rule for a LoRA weight wherever it is given, empty names and
folders refused, overflow blamed on the adapter, every LoRA of a recipe replayable from elsewhere and hash-checked,
and the A1111 listing of the loras folder."""

import json
import math
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FAST, run
from PIL import Image
from safetensors.torch import load_file, save_file
from serve_fixtures import make_models_folder
from test_lora import fresh
from test_lora_prompts import lora_file

from sdxl.adapters.apply import applied_adapters, use_adapters
from sdxl.adapters.lora import load_lora, place, sites, target
from sdxl.adapters.tags import MAX_LORA_WEIGHT, find_lora, lora_spec, split_loras
from sdxl.errors import SDXLError
from sdxl.formats.png import file_hash, lora_entry, parse_recipe, replay_lora
from sdxl.serve.native import spec_from_body

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The models folder: tiny checkpoints, loras/style.safetensors, loras/a.safetensors, loras/sub/a.safetensors."""
    root = make_models_folder(tmp_path_factory.mktemp("models"))
    (root / "loras" / "sub").mkdir()
    return root, lora_file(root / "loras" / "a.safetensors", 3), lora_file(root / "loras" / "sub" / "a.safetensors", 4)


# --- one rule for a weight ------------------------------------------------------------------------------

ACCEPTED = [("0.8", 0.8), ("1e-5", 1e-5), ("+0.5", 0.5), ("-2", -2.0), (".5", 0.5), ("10", 10.0), ("-1E+1", -10.0),
            ("2.", 2.0)]
REFUSED = ["1_0", "nan", "inf", "-inf", "1e400", "10.5", "1e6", "0x1", "true", "", "0.8.1"]


def weight_in(form: str, text: str) -> float:
    """The weight `text` read as each place takes a LoRA weight: --lora, a prompt tag (te, then unet), a recipe."""
    if form == "--lora":
        return lora_spec(f"x.safetensors:{text}")[1]
    if form == "tag":
        return split_loras(f"a <lora:x:{text}>")[1][0].te
    if form == "tag-unet":
        return split_loras(f"a <lora:x:0.1:{text}>")[1][0].unet
    return lora_spec(parse_recipe({"prompt": "a", "models": {"lora0": f"x.safetensors:{text}"}}, "r.png").models[
        "lora0"])[1]


@pytest.mark.parametrize("form", ["--lora", "tag", "tag-unet", "recipe"])
def test_one_weight_rule_everywhere(form):
    for text, value in ACCEPTED:
        assert weight_in(form, text) == value, text
    named = {"--lora": "--lora 'x.safetensors:{}'", "tag": "<lora:x:{}>", "tag-unet": "<lora:x:0.1:{}>",
             "recipe": "r.png: models.lora0"}[form]
    for text in REFUSED:
        with pytest.raises(SDXLError) as e:
            weight_in(form, text)
        assert str(e.value) == (f"{named.format(text)}: the weight {text!r} must be a number from -10 to 10, "
                                "e.g. 0.8"), text
    assert MAX_LORA_WEIGHT == 10


def test_server_loras_field_takes_the_same_rule():
    spec = spec_from_body({"prompt": "a", "loras": [["a", 1e-5], ["sub/a", -3]]}, "POST /v1/jobs")
    assert spec.loras == (("a", 1e-5), ("sub/a", -3.0))
    for bad in (math.nan, math.inf, 1e6, True):
        with pytest.raises(SDXLError, match=r"^POST /v1/jobs: loras\[1\] 'b': the weight .* must be a number from -10"):
            spec_from_body({"prompt": "a", "loras": [["a", 1], ["b", bad]]}, "POST /v1/jobs")


def test_a_recorded_weight_replays_exactly(folder, tmp_path):
    root, a, _ = folder
    for w in ("1e-5", "-0.25", "+2"):
        entry = lora_entry(f"{a}:{w}", None)
        assert entry == f"{a.resolve()}:{float(w)!r}"
        parse_recipe({"prompt": "a", "models": {"lora0": entry}}, "r.png")  # accepted as written
        assert lora_spec(replay_lora(entry, None, "r.png: lora0")) == (str(a.resolve()), float(w))
    assert lora_entry(f"{a}:1e-5", str(root / "loras")) == "a.safetensors:1e-05"  # inside the LoRA folder: relative


# --- names --------------------------------------------------------------------------------------------------

def test_empty_names_are_refused(folder):
    root, _, _ = folder
    for spec in ("", " ", ":0.5"):
        with pytest.raises(SDXLError, match=rf"^--lora {spec!r}: no LoRA file given; write FILE or FILE:WEIGHT"):
            lora_spec(spec)
    for name in ("", "  "):
        with pytest.raises(SDXLError, match=r"^lora '': no LoRA name; give a name listed in loras"):
            find_lora(name, root / "loras")
    for tag in ("<lora: :0.5>", "<lora::1>"):
        with pytest.raises(SDXLError, match="no LoRA name"):
            split_loras(f"a {tag}")


def test_a_tag_finds_files_never_a_folder(folder, tmp_path):
    _, a, _ = folder
    (tmp_path / "lora").mkdir()  # a diffusers LoRA folder named like the file
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(a.read_bytes())
    (tmp_path / "lora.safetensors").write_bytes(a.read_bytes())
    assert find_lora("lora", tmp_path) == tmp_path / "lora.safetensors"
    (tmp_path / "lora.safetensors").unlink()
    with pytest.raises(SDXLError, match=r"lora 'lora': no such file in loras .*; choose one of: pytorch_lora_weights$"):
        find_lora("lora", tmp_path)


# --- overflow: the adapter and its weight named ----------------------------------------------------------

def test_an_overflowing_or_nonfinite_weight_names_the_adapter(folder):
    _, a, _ = folder
    model = fresh()
    for bad in (math.nan, math.inf):
        with pytest.raises(SDXLError, match=rf"^{a}: the weights 1.0, {bad} must be finite numbers$"):
            use_adapters(model, [(a, 1.0, bad)])
        with pytest.raises(SDXLError, match=rf"^{a}: the weights {bad}, 1.0 must be finite numbers$"):
            load_lora(model, a, bad, 1.0)
    with pytest.raises(SDXLError, match=rf"^{a}: its lora change of lora_unet_\w+ overflows \(non-finite\) at weight "
                                        r"1e\+300; use a smaller weight$"):
        use_adapters(model, [(a, 1.0, 1e300)])
    half = fresh().half()  # finite in fp32, beyond fp16's 65504 once rounded to the weight's dtype
    with pytest.raises(SDXLError, match=r"overflows \(non-finite\) at weight 1e\+08"):
        use_adapters(half, [(a, 1e8, 1e8)])
    assert applied_adapters(model) == applied_adapters(half) == ()


def test_sampling_that_a_lora_makes_nonfinite_names_it(folder, tmp_path, capsys):
    root, a, _ = folder
    sd = load_file(a)  # UNet up/down scaled by 1e12: the change (~1e24) is finite, the activations overflow
    save_file({k: v * 1e12 if k.startswith("lora_unet") and "alpha" not in k else v for k, v in sd.items()},
              tmp_path / "loud.safetensors")
    code, _, err = run(capsys, "generate", "a cat", "--model", root / "checkpoints" / "tiny.safetensors", *FAST,
                       "--lora", f"{tmp_path / 'loud.safetensors'}:2", "-o", tmp_path / "x.png")
    assert code == 2 and (f"sampling gave non-finite values (NaN/Inf) with the LoRA(s) {tmp_path / 'loud.safetensors'} "
                          "at weight 2: their change overflows; lower their weights") in err, err
    assert not (tmp_path / "x.png").exists()


# --- recipes: every LoRA portable and hash-checked ------------------------------------------------------------

def test_every_lora_replays_from_elsewhere_and_is_hash_checked(folder, tmp_path, capsys, monkeypatch):
    root, a, _ = folder
    loras = root / "loras"
    outside = tmp_path / "mine" / "b.safetensors"
    outside.parent.mkdir()
    lora_file(outside, 7)
    monkeypatch.chdir(root)  # paths given relative to the working directory
    common = ("--model", root / "checkpoints" / "tiny.safetensors", "--seed", 5, *FAST)
    code, _, err = run(capsys, "generate", "a star <lora:style:0.7>", *common, "--lora", "loras/a.safetensors:1e-5",
                       "--lora", os.path.relpath(outside, root), "--lora-dir", "loras", "-o", tmp_path / "t.png")
    assert code == 0, err
    rec = json.loads(Image.open(tmp_path / "t.png").info["sdxl-recipe"])
    assert rec["models"]["lora0"] == "a.safetensors:1e-05" and rec["models"]["lora1"] == f"{outside.resolve()}:1.0"
    assert rec["hashes"]["lora0"] == file_hash(a)[:10] and rec["hashes"]["lora1"] == file_hash(outside)[:10]
    assert rec["lora_dir"] == str(loras.resolve())
    monkeypatch.chdir(tmp_path / "mine")  # elsewhere: the same pixels
    code, _, err = run(capsys, "generate", "--from-png", tmp_path / "t.png", "-q", "-o", tmp_path / "r.png")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t.png")), np.asarray(Image.open(tmp_path / "r.png")))
    # a LoRA folder elsewhere holding other bytes under the recorded name: warned, weight or not
    other = tmp_path / "other"
    other.mkdir()
    (other / "style.safetensors").write_bytes((loras / "style.safetensors").read_bytes())
    lora_file(other / "a.safetensors", 9)
    outside.unlink()
    lora_file(outside, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(capsys, "generate", "--from-png", tmp_path / "t.png", "--lora-dir", other, "-q", "-o",
                           tmp_path / "w.png")
    assert code == 0, err
    assert sorted(str(w.message).split(" has hash")[0] for w in caught if "has hash" in str(w.message)) == [
        f"lora0 {other / 'a.safetensors'}", f"lora1 {outside}"]
    (other / "a.safetensors").unlink()
    code, _, err = run(capsys, "generate", "--from-png", tmp_path / "t.png", "--lora-dir", other, "-o",
                       tmp_path / "m.png")
    assert code == 2 and f"{tmp_path / 't.png'}: lora0: the LoRA a.safetensors is not here; give --lora-dir DIR" in err


def test_a_link_out_of_the_lora_folder_is_named_not_followed(tmp_path):
    """Nothing outside the LoRA folder is read (a server's loras/ must not reach other files), and a link that
    leads out is named in the message rather than the folder looking empty."""
    (tmp_path / "loras").mkdir()
    lora_file(tmp_path / "elsewhere.safetensors", 3)
    (tmp_path / "loras" / "linked.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(SDXLError, match="linked.safetensors is a link to a file outside the folder, which is not "
                                        "followed: copy or move the file in"):
        find_lora("linked", tmp_path / "loras")


def test_a_moved_lora_file_is_found_by_name_in_the_folder_given(folder, tmp_path, capsys):
    """--lora FILE:W recorded with its absolute path, the file moved since: `--lora-dir DIR` (as the message says)
    finds it by name there, with its weight; without it, the message names the weight to give with --lora."""
    root, _, _ = folder
    mine = tmp_path / "mine" / "b.safetensors"
    mine.parent.mkdir()
    lora_file(mine, 7)
    common = ("--model", root / "checkpoints" / "tiny.safetensors", "--seed", 5, *FAST)
    assert run(capsys, "generate", "a star", *common, "--lora", f"{mine}:0.8", "-o", tmp_path / "t.png")[0] == 0
    (tmp_path / "moved").mkdir()
    mine.rename(tmp_path / "moved" / "b.safetensors")
    code, _, err = run(capsys, "generate", "--from-png", tmp_path / "t.png", "-o", tmp_path / "x.png")
    assert code == 2 and "give --lora-dir DIR (the folder it is in) or --lora FILE:0.8" in err
    code, _, err = run(capsys, "generate", "--from-png", tmp_path / "t.png", "--lora-dir", tmp_path / "moved", "-q",
                       "-o", tmp_path / "r.png")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t.png")), np.asarray(Image.open(tmp_path / "r.png")))


# --- the site layout written once; the A1111 listing ------------------------------------------------------------

def test_place_and_target_are_one_rule():
    model = fresh()
    for s in sites(model.cfg):
        module, name, view = place(model, s)
        assert target(model, s).data_ptr() == view(getattr(module, name)).data_ptr()
        assert target(model, s).shape == view(getattr(module, name)).shape


def test_a1111_lists_loras_as_a1111_does(folder, tmp_path):
    from sdxl.serve.a1111 import loras
    from sdxl.serve.models import ModelsFolder

    root, a, sub_a = folder
    save_file(load_file(sub_a), root / "loras" / "sub" / "named.safetensors", metadata={"ss_output_name": "nice"})
    app = SimpleNamespace(state=SimpleNamespace(models=ModelsFolder(root, "cpu", "fp32")))
    listed = {x["path"]: x for x in loras(SimpleNamespace(app=app))}
    named = root / "loras" / "sub" / "named.safetensors"
    assert {p: (x["name"], x["alias"]) for p, x in listed.items()} == {
        str(a): ("a", "a"), str(sub_a): ("a", "a"), str(named): ("named", "nice"),
        str(root / "loras" / "style.safetensors"): ("style", "style")}
    assert listed[str(root / "loras" / "sub" / "named.safetensors")]["metadata"] == {"ss_output_name": "nice"}
    assert find_lora("sub/a", root / "loras") == sub_a and find_lora("nice", root / "loras") == \
        root / "loras" / "sub" / "named.safetensors"
    with pytest.raises(SDXLError, match="2 files in loras"):  # two stems `a`: sub/NAME tells them apart
        find_lora("a", root / "loras")
    (root / "loras" / "sub" / "named.safetensors").unlink()


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_lora_dir_that_is_no_folder_is_refused_even_without_tags(kind, tmp_path, capsys):
    from sdxl.cli import main

    bad = tmp_path / "t.txt"
    if kind == "file":
        bad.write_text("x")
    assert main(["generate", "a cat", "--lora-dir", str(bad), "-o", str(tmp_path / "o.png"), "-q"]) == 2
    assert f"--lora-dir {bad}: not a folder; give the folder that holds the LoRAs" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
