"""LoRAs as A1111 users name them: `<lora:NAME:TE:UNET>` tags found in a LoRA folder, recorded in the infotext with
A1111's hashes and replayed; applied merged or at run time and switched between requests without reloading."""

import hashlib
import json
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import FAST, run
from PIL import Image
from serve_fixtures import FAST as SERVE_FAST
from serve_fixtures import make_models_folder
from test_lora import ALL_TARGETS, fresh, outputs

from sdxl.adapters.apply import applied_adapters, remove_adapters, use_adapters
from sdxl.errors import SDXLError
from sdxl.adapters.lora import add_lora, load_lora, save_lora
from sdxl.formats.png import file_hash, lora_hash
from sdxl.adapters.tags import LoraUse, find_lora, split_loras

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_file(path, seed: int, dora: bool = False):
    """A random kohya LoRA on every UNet layer kind and both text encoders (bigG's fused q/k/v too); with `dora`,
    one UNet layer is weight-decomposed (kohya's dora_scale), so its delta depends on the weight it is added to."""
    model = fresh()
    params = add_lora(model, rank=4, alpha=2.0, text_encoders=True, targets=ALL_TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = save_lora(model, path)
    if dora:
        from safetensors.torch import load_file, save_file

        sd = load_file(path)
        up = next(k for k in sorted(sd) if k.startswith("lora_unet") and "to_q.lora_up" in k)
        sd[up.replace("lora_up.weight", "dora_scale")] = torch.rand(sd[up].shape[0], 1, generator=g) + 0.5
        path.unlink()
        save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """loras/a.safetensors, loras/sub/b.safetensors (with DoRA), and the tiny checkpoints: the models folder."""
    root = make_models_folder(tmp_path_factory.mktemp("models"))
    (root / "loras" / "sub").mkdir()
    return root, lora_file(root / "loras" / "a.safetensors", 3), lora_file(root / "loras" / "sub" / "b.safetensors", 4,
                                                                          dora=True)


# --- the tag syntax, the folder, the hash -----------------------------------------------------------

@pytest.mark.parametrize("tag, te, unet", [
    ("<lora:x>", 1.0, 1.0), ("<lora:x:0.8>", 0.8, 0.8), ("<lora:x:0.8:0.5>", 0.8, 0.5),  # 2nd number: the UNet's
    ("<lora:x:te=0.3:unet=0.7>", 0.3, 0.7), ("<lora:x:0.8:unet=0.2>", 0.8, 0.2), ("<lora:x:unet=0.2>", 1.0, 0.2),
    ("<lora:x:te=0.4>", 0.4, 0.4), ("<lyco:x:-0.5>", -0.5, -0.5), ("<lora:x:1e-1:2>", 0.1, 2.0)])
def test_tag_multipliers_as_a1111_reads_them(tag, te, unet):
    assert split_loras(f"a cat, {tag} sitting") == ("a cat, sitting", (LoraUse("x", None, te, unet),))


def test_tag_text_and_errors():
    # the text the encoders see: A1111 deletes the tag (spaces tidied, commas kept: they are tokens)
    assert split_loras("<lora:my style:1>, a cat,<lora:b>") == (", a cat,", (LoraUse("my style"), LoraUse("b")))
    for tag, message in (("<lora:x:strong>", "'strong' must be a number"), ("<lora:x:nan>", "must be a number"),
                         ("<lora:x:1:1:4>", "'4' is not supported"), ("<lora:x:dyn=4>", "'dyn' is not supported"),
                         ("<lora::1>", "no LoRA name")):
        with pytest.raises(SDXLError, match=message):
            split_loras(f"a {tag}")


def test_names_found_as_a1111_finds_them(files, tmp_path):
    root, a, b = files
    loras = root / "loras"
    assert find_lora("a", loras) == a and find_lora("b", loras) == b and find_lora("sub/b", loras) == b
    with pytest.raises(SDXLError, match=r"lora 'bb': no such file in loras .*close names: b$"):
        find_lora("bb", loras)
    with pytest.raises(SDXLError, match="choose one of: a, b, style"):
        find_lora("zzzz", loras)
    with pytest.raises(SDXLError, match="not a path"):
        find_lora("../a", loras)
    with pytest.raises(SDXLError, match="is not a folder"):
        find_lora("a", loras / "a.safetensors")
    # two files of one stem: the path inside the folder tells them apart; an alias (ss_output_name) is found too
    (tmp_path / "x").mkdir()
    for p in (tmp_path / "a.safetensors", tmp_path / "x" / "a.safetensors", tmp_path / "c.ckpt"):
        p.write_bytes(a.read_bytes() if p.suffix == ".safetensors" else b"pickle")
    with pytest.raises(SDXLError, match=r"2 files .* \(a, x/a\); write the one meant, e.g. <lora:x/a:1>"):
        find_lora("a", tmp_path)
    assert find_lora("x/a", tmp_path) == tmp_path / "x" / "a.safetensors"
    with pytest.raises(SDXLError, match="pickle format, never loaded"):
        find_lora("c", tmp_path)
    from safetensors.torch import load_file, save_file

    save_file(load_file(a), tmp_path / "renamed.safetensors", {"ss_output_name": "my_style"})
    assert find_lora("my_style", tmp_path) == tmp_path / "renamed.safetensors"


def test_lora_hash_is_a1111s(files):
    _, a, _ = files
    data = a.read_bytes()  # modules/hashes.py addnet_hash_safetensors: sha256 after the 8 + n header bytes
    want = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert lora_hash(a) == want and file_hash(a)[:12] == hashlib.sha256(data).hexdigest()[:12] != want


# --- merged and runtime application ------------------------------------------------------------------

def state(model) -> dict[str, torch.Tensor]:
    """The stored weights by official key (at run time a parametrized weight is stored as `.original`)."""
    return {re.sub(r"parametrizations\.(\w+)\.original", r"\1", k): v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("runtime", [False, True], ids=["merged", "runtime"])
def test_apply_then_remove_restores_every_weight_bit_exactly(files, runtime):
    _, a, b = files
    model = fresh()
    before = state(model)
    use_adapters(model, [(a, 0.7, 1.3), (b, 1.0, -0.6)], runtime)
    changed = {k: not torch.equal(v, before[k]) for k, v in state(model).items()}
    assert any(changed.values()) != runtime  # runtime: the stored weights are untouched
    assert applied_adapters(model) == ((str(a), 0.7, 1.3), (str(b), 1.0, -0.6))
    remove_adapters(model)
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_runtime_output_equals_merged(files):
    """fp32: the runtime weights are the merged ones bit for bit (the same delta, rounded and added in the same
    order, DoRA reading the weight as changed so far), so the outputs are equal (tolerance 0)."""
    _, a, b = files
    merged, runtime = fresh(), fresh()
    plain = outputs(merged)
    for model, mode in ((merged, False), (runtime, True)):
        use_adapters(model, [(a, 0.7, 1.3), (b, 1.0, -0.6)], mode)
    m, r = outputs(merged), outputs(runtime)
    for k in m:
        assert torch.equal(m[k], r[k]) and not torch.allclose(m[k], plain[k]), k


def test_lycoris_biases_and_norms_at_run_time_equal_merged(tmp_path):
    """LoHa, a full diff with its bias (diff_b) and bigG's final LayerNorm (w_norm, b_norm): the runtime
    parametrizations of weights and biases give the merged outputs, and come off exactly."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    conv, proj, norm = ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_middle_block_1_proj_in",
                        "lora_te2_text_model_final_layer_norm")
    shapes = {f"{conv}.diff": (64, 64, 3, 3), f"{conv}.diff_b": (64,), f"{norm}.w_norm": (128,),
              f"{norm}.b_norm": (128,), **{f"{proj}.hada_w{i}_{ab}": (128, 4) if ab == "a" else (4, 128)
                                           for i in (1, 2) for ab in "ab"}}
    tensors = {k: torch.randn(v, generator=g) * 0.1 for k, v in shapes.items()} | {f"{proj}.alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "ly.safetensors")
    merged, runtime = fresh(), fresh()
    before = state(runtime)
    for model, mode in ((merged, False), (runtime, True)):
        use_adapters(model, [(tmp_path / "ly.safetensors", -0.5, 1.5)], mode)
    m, r, plain = outputs(merged), outputs(runtime), outputs(fresh())
    assert all(torch.equal(m[k], r[k]) for k in m)
    # ln_final changes the pooled embedding, not the context (bigG's penultimate layer)
    assert [torch.equal(m[k], plain[k]) for k in ("unet", "pooled", "crossattn")] == [False, False, True]
    remove_adapters(runtime)
    assert all(torch.equal(v, before[k]) for k, v in state(runtime).items())


def test_merged_equals_load_lora(files):
    """The same patches, multipliers and rounding as sdxl.adapters.lora.load_lora: equal weights."""
    _, a, b = files
    ours, theirs = fresh(), fresh()
    use_adapters(ours, [(a, 0.7, 1.3), (b, 1.0, -0.6)])
    load_lora(theirs, a, 1.3, te_multiplier=0.7)
    load_lora(theirs, b, -0.6, te_multiplier=1.0)
    o, t = state(ours), state(theirs)
    assert all(torch.equal(o[k], t[k]) for k in o)


@pytest.mark.parametrize("runtime", [False, True], ids=["merged", "runtime"])
def test_switching_a_to_b_equals_b_on_a_fresh_model(files, runtime):
    _, a, b = files
    switched, b_only = fresh(), fresh()
    use_adapters(switched, [(a, 1.0, 1.0)], runtime)
    assert use_adapters(switched, [(a, 1.0, 1.0)], runtime) == []  # the same set again: nothing is done
    use_adapters(switched, [(b, 0.5, 0.9)], runtime)
    use_adapters(b_only, [(b, 0.5, 0.9)], runtime)
    s, f = outputs(switched), outputs(b_only)
    assert all(torch.equal(s[k], f[k]) for k in s)


def test_te_and_unet_multipliers_reach_their_components(files):
    _, a, _ = files
    model = fresh()
    before = state(model)
    for te, unet, changes in ((0.0, 1.0, {"model."}), (1.0, 0.0, {"conditioner."})):
        use_adapters(model, [(a, te, unet)])
        changed = {k.split(".")[0] + "." for k, v in state(model).items() if not torch.equal(v, before[k])}
        assert changed == changes
    remove_adapters(model)


def test_a_failed_set_changes_nothing(files, tmp_path):
    _, a, _ = files
    model = fresh()
    before = state(model)
    with pytest.raises(SDXLError):
        use_adapters(model, [(a, 1.0, 1.0), (tmp_path / "missing.safetensors", 1.0, 1.0)])
    with pytest.raises(SDXLError, match="non-finite"):
        use_adapters(model, [(a, 1.0, 1e300)])
    assert applied_adapters(model) == () and all(torch.equal(v, before[k]) for k, v in state(model).items())


# --- the CLI: infotext, recipe, replay ----------------------------------------------------------------

def test_tags_recorded_as_a1111_and_replayed(files, tmp_path, capsys):
    root, a, b = files
    prompt = "a star <lora:a:0.6>, on a field <lora:b:0.4:1.1>"
    common = ("--model", root / "checkpoints" / "tiny.safetensors", "--seed", 5, *FAST)
    code, _, err = run(capsys, "generate", prompt, *common, "--lora-dir", root / "loras", "-o", tmp_path / "t.png")
    assert code == 0, err
    im = Image.open(tmp_path / "t.png")
    text, rec = im.info["parameters"], json.loads(im.info["sdxl-recipe"])
    assert text.startswith(prompt + "\n") and rec["prompt"] == prompt  # the tags stay where they were
    assert f'Lora hashes: "a: {lora_hash(a)}, b: {lora_hash(b)}"' in text
    assert rec["lora_hashes"] == {"a": lora_hash(a), "b": lora_hash(b)}
    # the same image with the LoRAs given as files (--lora takes one weight, so b's UNet weight differs: not equal)
    code, _, _ = run(capsys, "generate", "a star, on a field", *common, "--lora", f"{a}:0.6", "-o", tmp_path / "f.png")
    assert code == 0 and not np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "f.png")))
    # replayed from the PNG: the recorded folder, or --lora-dir; equal pixels
    for flags in ((), ("--lora-dir", root / "loras")):
        code, _, err = run(capsys, "generate", "--from-png", tmp_path / "t.png", *flags, "-q", "-o", tmp_path / "r.png")
        assert code == 0, err
    for r in ("r.png", "r-1.png"):
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / r)))
    # a LoRA folder where b differs: a warning naming the file; where b is missing: an error
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "a.safetensors").write_bytes(a.read_bytes())
    lora_file(other / "sub" / "b.safetensors", 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, _ = run(capsys, "generate", "--from-png", tmp_path / "t.png", "--lora-dir", other, "-q", "-o",
                         tmp_path / "w.png")
    assert code == 0 and [str(w.message) for w in caught] == [
        f"LoRA b: {other / 'sub' / 'b.safetensors'} has hash {lora_hash(other / 'sub' / 'b.safetensors')} but "
        f"{tmp_path / 't.png'} was made with hash {lora_hash(b)}; the image will differ"]
    (other / "sub" / "b.safetensors").unlink()
    code, _, err = run(capsys, "generate", "--from-png", tmp_path / "t.png", "--lora-dir", other, "-o",
                       tmp_path / "m.png")
    assert code == 2 and f"lora 'b': no such file in loras ({other}); choose one of: a" in err


def test_each_prompt_of_a_file_gets_its_own_loras(files, tmp_path, capsys):
    root, _, _ = files
    lines = ["a star <lora:b>", "a star <lora:a:0.6>"]
    (tmp_path / "p.txt").write_text("\n".join(lines))
    common = ("--model", root / "checkpoints" / "tiny.safetensors", "--seed", 5, *FAST, "--lora-dir", root / "loras")
    assert run(capsys, "generate", "--prompts", tmp_path / "p.txt", *common, "-o", tmp_path / "all.png")[0] == 0
    for k, line in enumerate(lines):  # prompt k's seed is 5 + k
        out = tmp_path / f"{k}.png"
        code, _, _ = run(capsys, "generate", line, *common[:2], "--seed", 5 + k, *common[4:], "-o", out)
        assert code == 0
        one, alone = np.asarray(Image.open(tmp_path / f"all-{k:04d}.png")), np.asarray(Image.open(out))
        assert np.array_equal(one, alone), line


# --- the server: one load, a set per job -------------------------------------------------------------

def test_server_switches_loras_without_reloading(files, tmp_path, monkeypatch):
    import sdxl.serve.models as served_models
    from sdxl.serve.jobs import Jobs, JobSpec
    from sdxl.serve.models import ModelsFolder

    root, _, _ = files
    loads = []
    load = served_models.load_pipeline
    monkeypatch.setattr(served_models, "load_pipeline", lambda *a, **kw: loads.append(a[0].model) or load(*a, **kw))

    def images(prompts: list[str], out) -> list[np.ndarray]:
        jobs = Jobs(out / "jobs.db", ModelsFolder(root, "cpu", "fp32"), out).start()
        try:
            done = [jobs.wait(jobs.submit(JobSpec({"prompt": p, "seed": 3} | SERVE_FAST))) for p in prompts]
        finally:
            jobs.close()
        assert [d.state for d in done] == ["done"] * len(prompts)
        return [np.asarray(Image.open(d.images[0])) for d in done]

    prompts = ["a cat <lora:a:0.8>", "a cat <lora:b:0.5:1.2>", "a cat", "a cat <lora:a:0.8>"]
    switched = images(prompts, tmp_path / "one")
    assert len(loads) == 1  # four LoRA sets, one checkpoint load
    fresh_images = [images([p], tmp_path / f"fresh{i}")[0] for i, p in enumerate(prompts[1:3])]
    assert len(loads) == 3
    # A -> B equals B alone, B -> none equals none, none -> A equals A first (the first job: a fresh load)
    for p, s, f in zip(prompts[1:], switched[1:], fresh_images + switched[:1]):
        assert np.array_equal(s, f), p
    assert not np.array_equal(switched[0], switched[2]) and not np.array_equal(switched[1], switched[2])
