"""Seeded mutation fuzzing of what users hand us as files (issue 11, Deliver): safetensors headers through
`sdxl inspect`, LoRA tensors and metadata through `load_lora`. Every input ends in success or in exit 2 with
one line (an SDXLError), never a traceback; a refused LoRA changes nothing. Bounded by a fixed number of cases."""

import json
import random

import pytest
import torch
from conftest import randomize
from safetensors.torch import save_file

from sdxl.cli import main
from sdxl.errors import SDXLError
from sdxl.formats import checkpoint as ck
from sdxl.adapters.lora import load_lora
from sdxl.models.model import TINY_BASE, SDXLModel

pytestmark = pytest.mark.usefixtures("one_thread")
NASTY = [None, True, -1, 0, 1, 2**64, float("inf"), float("nan"), 1e400, "abc", "", "F32", [], {}, [[[]]], [-1],
         [2**40], {"a": 1}, "(" * 3, "\u00e9\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}


def deep(n: int):
    v = 1
    for _ in range(n):
        v = [v]
    return v


def mutate_value(rng: random.Random, v):
    """One mutation of a JSON value: a nasty replacement, or a small change of a number, list or string."""
    r = rng.random()
    if r < 0.4:
        return rng.choice(NASTY + [deep(rng.choice([10, 200, 800]))])
    if isinstance(v, bool) or v is None:
        return not v
    if isinstance(v, (int, float)):
        return rng.choice([v + 1, v - 1, v * 2, -v, v // 2 if isinstance(v, int) else v / 2, 0])
    if isinstance(v, list) and v:
        w = list(v)
        i = rng.randrange(len(w))
        choice = rng.random()
        if choice < 0.3:
            del w[i]
        elif choice < 0.6:
            w.insert(i, rng.choice(w))
        else:
            w[i] = mutate_value(rng, w[i])
        return w
    if isinstance(v, str):
        return rng.choice([v[::-1], v + "x", v[:-1], v.upper(), v.replace(".", "_")])
    return rng.choice(NASTY)


# --- safetensors headers through `sdxl inspect` -----------------------------------------------------

@pytest.fixture(scope="module")
def header():
    """The tiny base's header (key -> dtype, shape), written with consistent offsets by `layout`."""
    return {k: {"dtype": "F16", "shape": list(s)} for k, s in ck.expected_shapes(TINY_BASE).items()}


def layout(entries: dict) -> tuple[dict, int]:
    """Consistent data_offsets for entries with valid dtypes and shapes (others, and __metadata__, kept as they are)."""
    out, offset = {}, 0
    for k, e in entries.items():
        if k == "__metadata__" or not isinstance(e, dict):
            out[k] = e
            continue
        e = dict(e)
        try:
            n = BYTES[e["dtype"]]
            for d in e["shape"]:
                n *= int(d)
            if not 0 <= n < 2**31:
                raise ValueError
            e["data_offsets"] = [offset, offset + n]
            offset += n
        except (KeyError, TypeError, ValueError, OverflowError):
            e.setdefault("data_offsets", [offset, offset])
        out[k] = e
    return out, offset


def mutate_header(rng: random.Random, entries: dict) -> tuple[dict, bool]:
    """A few mutations of tensor entries; returns (entries, whether to re-lay the offsets consistently)."""
    entries = {k: dict(v) for k, v in entries.items()}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(entries))
        what = rng.choice(["dtype", "shape", "shape", "offsets", "drop", "rename", "metadata", "entry"])
        if what == "dtype":
            entries[key]["dtype"] = rng.choice(list(BYTES) + ["F4", "C64", "U16", "X"])
        elif what == "shape":
            entries[key]["shape"] = mutate_value(rng, entries[key]["shape"])
        elif what == "offsets":
            entries[key]["data_offsets"] = mutate_value(rng, entries[key].get("data_offsets", [0, 0]))
        elif what == "drop":
            del entries[key]
        elif what == "rename":
            entries[rng.choice([key[::-1], key + "x", key.replace("model.", "", 1), key.replace(".", "_")])] = entries.pop(key)
        elif what == "metadata":
            entries["__metadata__"] = rng.choice([{"a": "b"}, {"a": 1}, [], "x", deep(300), {"a": "(" * 10**5}])
        else:
            entries[key] = mutate_value(rng, entries[key])
    return entries, rng.random() < 0.6


def write_header(path, entries: dict, relayout: bool, rng: random.Random) -> None:
    """Header + a sparse data section (truncate: nothing written) of the size the offsets ask for, give or take."""
    if relayout:
        entries, size = layout(entries)
    else:
        size = rng.choice([0, 1000, 10**6])
    raw = json.dumps(entries, allow_nan=True).encode()
    if rng.random() < 0.05:  # a 100k-deep value (more than Python's json or its encoder can nest)
        raw = raw[:-1] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if rng.random() < 0.2:  # byte-level damage too
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + size)


def test_fuzz_safetensors_headers_via_inspect(header, tmp_path, capsys):
    rng = random.Random(11)
    outcomes = {0: 0, 2: 0}
    base, _ = layout(header)
    for case in range(600):
        entries, relayout = mutate_header(rng, base)
        path = tmp_path / f"case{case % 4}.safetensors"
        write_header(path, entries, relayout, rng)
        code = main(["inspect", str(path), "--json"])
        out = capsys.readouterr()
        assert code in (0, 2), f"case {case}: exit {code}"
        if code == 2:
            assert out.err.startswith("sdxl: error: ") and out.err.count("\n") == 1, f"case {case}: {out.err!r}"
        else:
            assert json.loads(out.out)["format"] == "single-file", f"case {case}"
        outcomes[code] += 1
    assert outcomes[0] >= 50 and outcomes[2] >= 300, outcomes  # both outcomes exercised


# --- LoRA tensors and metadata through load_lora ---------------------------------------------------

MODULES = {  # kohya name, PEFT name, (out, in) of the tiny base's layer
    "lora_unet_middle_block_1_proj_in": ("unet.mid_block.attentions.0.proj_in", (128, 128)),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": ("text_encoder.text_model.encoder.layers.0.mlp.fc1", (512, 128)),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
                                                              (128, 128)),
}


def lora_file(rng: random.Random, g: torch.Generator) -> tuple[dict, dict | None]:
    """A small valid LoRA, kohya or PEFT (with adapter metadata), then mutated: tensors, names, dtypes, metadata."""
    peft = rng.random() < 0.5
    tensors, rank = {}, rng.choice([1, 2, 4])
    for name, (theirs, (o, i)) in MODULES.items():
        down, up = torch.randn(rank, i, generator=g) * 0.1, torch.randn(o, rank, generator=g) * 0.1
        if peft:
            tensors |= {f"{theirs}.lora_A.weight": down, f"{theirs}.lora_B.weight": up}
        else:
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
    config = {"unet.r": rank, "unet.lora_alpha": 2.0, "unet.alpha_pattern": {"proj_in": 4.0}, "text_encoder.lora_alpha": 1}
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["shape", "dtype", "drop", "rename", "alpha", "config", "config", "value"])
        key = rng.choice(sorted(tensors))
        if what == "shape":
            shape = [max(0, d + rng.choice([-d, -1, 1, d])) for d in tensors[key].shape] if rng.random() < 0.8 else [2, 2, 2]
            tensors[key] = torch.zeros(shape)
        elif what == "dtype":
            tensors[key] = tensors[key].to(rng.choice([torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                                       torch.float8_e5m2, torch.int8, torch.float64, torch.bool]))
        elif what == "drop":
            del tensors[key]
        elif what == "rename":
            tensors[rng.choice([key.replace("lora_te1_", "lora_te_"), key.replace(".lora_", ".lora."), "x" + key,
                                key.replace("lora_unet_", "unet.")])] = tensors.pop(key)
        elif what == "alpha":
            tensors[key.rsplit(".", 2)[0] + ".alpha"] = rng.choice([torch.tensor([1.0, 2.0]), torch.tensor(float("nan")),
                                                                   torch.tensor(0.0), torch.ones(0), torch.tensor(-3)])
        elif what == "value":
            tensors[key] = torch.full(tensors[key].shape, rng.choice([float("inf"), 1e30, -0.0]))
        else:
            k = rng.choice(sorted(config) + ["unet.use_dora", "unet.use_rslora", "text_encoder_2.alpha_pattern"])
            config[k] = mutate_value(rng, config.get(k, {"q_proj": 1.0}))
    meta = {"lora_adapter_metadata": json.dumps(config)} if peft or rng.random() < 0.2 else None
    if meta is not None and rng.random() < 0.1:
        meta["lora_adapter_metadata"] = rng.choice(["[1]", "{", "[" * 100_000 + "]" * 100_000, "null"])
    return tensors, meta


def test_fuzz_lora_files_via_load_lora(tmp_path):
    torch.manual_seed(0)
    model = randomize(SDXLModel(TINY_BASE), seed=0, scale=0.05).eval()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    # the same tensor objects, storage and version counters hold the same values (any in-place write bumps the
    # counter; `held` keeps the objects alive, so no id or address is reused): exact, and ~100x cheaper than
    # comparing every value after each case
    def stamp():
        return {k: (id(t), t.data_ptr(), t._version) for k, t in model.state_dict(keep_vars=True).items()}

    held, before = [model.state_dict(keep_vars=True)], stamp()
    rng, g = random.Random(5), torch.Generator().manual_seed(5)
    outcomes = {"merged": 0, "refused": 0}
    for case in range(250):
        tensors, meta = lora_file(rng, g)
        path = tmp_path / f"case{case % 4}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
        try:
            report = load_lora(model, path)
        except SDXLError as e:
            assert "\n" not in str(e), f"case {case}: {e}"
            assert stamp() == before, f"case {case} changed the model"
            outcomes["refused"] += 1
            continue
        changed = [k for k, v in stamp().items() if v != before[k]]
        state = model.state_dict()
        assert report.total >= 1 and changed and all(torch.isfinite(state[k]).all() for k in changed), f"case {case}"
        with torch.no_grad():
            for k in changed:  # back to the snapshot
                state[k].copy_(snapshot[k])
        held[:], before = [model.state_dict(keep_vars=True)], stamp()
        outcomes["merged"] += 1
    assert outcomes["merged"] >= 10 and outcomes["refused"] >= 50, outcomes
