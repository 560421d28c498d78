"""A prompt's LoRA tags, as A1111 writes them: `<lora:NAME:TE:UNET>` taken out of the prompt, each NAME found in the
LoRA folder (--lora-dir, a server's loras/), and the one rule for a LoRA's weight (tags, --lora FILE:W, recipes,
the server's JSON).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sdxl.errors import SDXLError

if TYPE_CHECKING:
    from sdxl.session import Models

# A1111's extra-network tag for LoRAs, `<lora:ARG:ARG...>`, and its `lyco` alias (stable-diffusion-webui v1.10.1:
# modules/extra_networks.py re_extra_net, extensions-builtin/Lora/scripts/lora_script.py)
LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]+)>")
TAG_UNSAFE = re.compile(r"[:,<>]")  # not in a tag's NAME: A1111 drops ':' and ',' from `Lora hashes` names too


def tag_name(name: str) -> str:
    """A LoRA's name as a `<lora:NAME:W>` tag and `Lora hashes` write it (a file `we:ird` is `weird`); `find_lora`
    finds the file by it."""
    return TAG_UNSAFE.sub("", name)


TAG_LIKE = re.compile(r"<\s*\w+\s*:[^>]*>?")  # what a user may mean as a tag: `<LORA:x:1>`, `<hypernet:x>`, `<lora:x:1`
PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")  # model files in pickle formats: listed as refused, never loaded


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a generation: its name (a tag's NAME, or a --lora file's stem), file, and the multipliers of the
    text encoders and the UNet; `tag`: from a `<lora:...>` tag in the prompt, else from --lora."""

    name: str
    path: str | None = None  # None until the name is found in the LoRA folder
    te: float = 1.0
    unet: float = 1.0
    tag: bool = True


def lora_free(prompt: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """The text the encoders see: the prompt(s) without their `<lora:...>` tags, as A1111 takes them out before its
    prompt parser (modules/extra_networks.py parse_prompt); spaces left around them are tidied, which leaves the
    CLIP tokens unchanged."""
    if not isinstance(prompt, str):
        return tuple(map(lora_free, prompt))
    return re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt))).strip()


def split_loras(prompt: str) -> tuple[str, tuple[LoraUse, ...]]:
    """A prompt's `<lora:...>` tags taken out: (the text the encoders see, a LoraUse per tag, not yet found)."""
    return lora_free(prompt), tuple(_lora_tag(m[1]) for m in LORA_TAG.finditer(prompt))


def _lora_tag(args: str) -> LoraUse:
    """`NAME[:TE[:UNET]]`, `te=`/`unet=` given by name, as A1111 reads a tag (extensions-builtin/Lora/
    extra_networks_lora.py and ExtraNetworkParams in modules/extra_networks.py, v1.10.1): the first number is the text
    encoders' multiplier (default 1), the second the UNet's (default: the first); an item with one `=` is named."""
    items = args.split(":")
    named = dict(i.split("=") for i in items if i.count("=") == 1)
    positional = [i for i in items if i.count("=") != 1]
    tag = f"<lora:{args}>"
    if not positional or not positional[0].strip():
        raise SDXLError(f"{tag}: no LoRA name; write <lora:NAME:0.8>")
    if bad := sorted(set(named) - {"te", "unet"}) or positional[3:]:
        raise SDXLError(f"{tag}: {bad[0]!r} is not supported; a tag takes NAME, a weight, a UNet weight, te=, unet=")
    te = lora_weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = lora_weight(named.get("unet", positional[2] if len(positional) > 2 else te), tag)
    return LoraUse(positional[0].strip(), None, te, unet)


# A1111 reads a LoRA weight with Python's float() and no limit (extensions-builtin/Lora/extra_networks_lora.py,
# v1.10.1), which takes `1_0`, `nan` and `inf`. One rule here: a decimal number, exponent allowed, |w| <=
# MAX_LORA_WEIGHT (beyond it a LoRA's change swamps the weights it is added to; sampling overflows).
MAX_LORA_WEIGHT = 10.0
_WEIGHT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def lora_weight(value, where: str) -> float:
    """A LoRA multiplier as --lora FILE:W, <lora:NAME:W:W>, the server's loras and recipes give it (text or a JSON
    number) -> float; anything else (`1_0`, nan, inf, 1e400, |w| > MAX_LORA_WEIGHT) is one line naming `where`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    w = float(value) if number or isinstance(value, str) and _WEIGHT.fullmatch(value.strip()) else math.nan
    if not (math.isfinite(w) and abs(w) <= MAX_LORA_WEIGHT):
        raise SDXLError(f"{where}: the weight {value!r} must be a number from -{MAX_LORA_WEIGHT:g} to "
                        f"{MAX_LORA_WEIGHT:g}, e.g. 0.8")
    return w + 0.0  # -0.0 is 0


def lora_spec(spec: str, where: str | None = None) -> tuple[str, float]:
    """"FILE" or "FILE:WEIGHT" -> (FILE, weight); a file whose name holds ':' is taken whole; `where` names the
    spec in messages (default: `--lora SPEC`)."""
    where = where or f"--lora {spec!r}"
    path, sep, weight = spec.rpartition(":") if not Path(spec).exists() and ":" in spec else (spec, "", "")
    if not path.strip():
        raise SDXLError(f"{where}: no LoRA file given; write FILE or FILE:WEIGHT, e.g. style.safetensors:0.8")
    return path, lora_weight(weight, where) if sep else 1.0


def inside(path: Path, folder: Path) -> bool:
    """`path` resolves (symlinks followed) to a place inside `folder`."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def find_lora(name: str, folder: str | Path | None) -> Path:
    """The LoRA file a tag's NAME means, found as A1111 finds it (extensions-builtin/Lora/networks.py
    list_available_networks): the stem of a file anywhere under `folder`, else the `ss_output_name` alias in a
    file's metadata; where two files share a stem, their paths inside the folder (sub/NAME) tell them apart.
    Nothing outside the folder (no paths, no symlinks out), and pickles are refused."""
    if not name.strip():
        raise SDXLError("lora '': no LoRA name; give a name listed in loras, e.g. <lora:NAME:0.8>")
    if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise SDXLError(f"lora {name!r}: give a name listed in loras, not a path")
    if folder is None:
        raise SDXLError(f"lora {name!r}: no LoRA folder to find it in (--lora-dir DIR; a server's loras/)")
    folder = Path(folder)
    if not folder.is_dir():
        raise SDXLError(f"lora {name!r}: the LoRA folder {folder} is " + ("not a folder" if folder.exists() else
                        "gone (moved or deleted)") + "; give --lora-dir DIR, the folder the LoRA is in now")
    files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".safetensors",) + PICKLES
             and not p.name.startswith(".") and p.is_file() and inside(p, folder)]
    stem = {p: p.relative_to(folder).with_suffix("").as_posix() for p in files}
    hits = ([p for p in files if name in (p.stem, stem[p])]
            or [p for p in files if name in (tag_name(p.stem), tag_name(stem[p]))]
            or [p for p in files if p.suffix.lower() == ".safetensors" and _alias(p) == name])
    if len(hits) > 1:
        raise SDXLError(f"lora {name!r}: {len(hits)} files in loras ({folder}) have that name "
                        f"({', '.join(stem[p] for p in hits)}); write the one meant, e.g. <lora:{stem[hits[-1]]}:1>")
    if hits and (why := lora_problem(hits[0])):
        raise SDXLError(f"lora {name!r}: {why}")
    if hits:
        return hits[0]
    names = sorted({p.stem for p in files if not lora_problem(p)})
    close = difflib.get_close_matches(name, names, n=5)
    out = [p for p in folder.rglob("*") if p.is_symlink() and name in (p.stem, p.name) and not inside(p, folder)]
    raise SDXLError(f"lora {name!r}: no such file in loras ({folder}); " + (
        f"{out[0]} is a link to a file outside the folder, which is not followed: copy or move the file in" if out
        else f"close names: {', '.join(close)}" if close else f"choose one of: {', '.join(names[:20]) or '(none)'}"))


def lora_problem(path: Path) -> str | None:
    """Why a file in a LoRA folder cannot be used (a pickle; a header that is no adapter: sdxl.adapters.lora
    adapter_problem), None when it can."""
    from sdxl.adapters.lora import adapter_problem

    if path.suffix.lower() in PICKLES:
        return f"{path} is a pickle format, never loaded; convert it to .safetensors"
    return adapter_problem(path)


def _alias(path: Path) -> str | None:
    """The name kohya's sd-scripts recorded for a LoRA (metadata ss_output_name), which A1111 also accepts."""
    from sdxl.formats.files import SafetensorsFile

    try:
        return SafetensorsFile(path).metadata.get("ss_output_name")
    except SDXLError:
        return None


def file_loras(models: Models) -> tuple[LoraUse, ...]:
    """The --lora files (FILE or FILE:WEIGHT), named by their stems."""
    return tuple(LoraUse(Path(path).stem, path, w, w, False) for path, w in map(lora_spec, models.loras))


def request_loras(req, models: Models) -> tuple[LoraUse, ...]:
    """Every LoRA of a request, found: the --lora files, then its prompt's tags in models.lora_dir (all the prompts
    of a batch must carry the same tags: one set is applied to the batch)."""
    prompts = (req.prompt,) if isinstance(req.prompt, str) else req.prompt
    tagged = {split_loras(p)[1] for p in prompts}
    if len(tagged) > 1:
        raise SDXLError("prompt: the prompts of one batch carry different <lora:...> tags; one set of LoRAs applies "
                        "to a batch, so give them the same tags (or generate them separately)")
    return file_loras(models) + tuple(replace(u, path=str(find_lora(u.name, models.lora_dir))) for u in tagged.pop())


def warn_stray_tags(req) -> None:
    """One warning for tag-like text the encoders will read as words: in the prompt anything but a `<lora:...>`/
    `<lyco:...>` tag (`<LORA:x:1>`, `<hypernet:x:1>`, `<lora:x:1` unclosed, `<lora:>`), and any tag in the negative
    and bigG prompts (LoRA tags are taken from the prompt only)."""
    def values(v):
        return [] if v is None else [v] if isinstance(v, str) else list(v)

    stray = [m[0] for p in values(req.prompt) for m in TAG_LIKE.finditer(p) if not LORA_TAG.fullmatch(m[0])]
    stray += [m[0] for v in (req.negative_prompt, req.prompt_2, req.negative_prompt_2) for p in values(v)
              for m in TAG_LIKE.finditer(p)]
    if stray:
        import warnings

        from sdxl.errors import first_few

        warnings.warn(f"{first_few(list(dict.fromkeys(stray)))}: not a LoRA tag, read as words; LoRA tags are "
                      "<lora:NAME:W> (lower case, closed) in the prompt only", stacklevel=2)
