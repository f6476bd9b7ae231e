"""Model families and loading: hub name or local path, fp32 on CPU, bf16 on GPU."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..config import ModelConfig
from .base import FamilyError, ModelFamily, Size
from .decoder import DecoderOnlyFamily
from .encdec import EncoderDecoderFamily
from .moe import NllbMoeFamily

FAMILIES: dict[str, type[ModelFamily]] = {
    EncoderDecoderFamily.name: EncoderDecoderFamily,
    DecoderOnlyFamily.name: DecoderOnlyFamily,
    NllbMoeFamily.name: NllbMoeFamily,
}
REFERENCE_MODELS = ("dense", "moe", "llama")

__all__ = ["FAMILIES", "FamilyError", "ModelFamily", "Size", "family_class", "load_family", "model_units", "model_fingerprint",
           "resolve_model_path", "stored_dtype"]


def resolve_model_path(name: str) -> str:
    """``reference:NAME`` -> the shipped model's directory; anything else is passed to HF as is."""
    if name.startswith("reference:"):
        which = name.split(":", 1)[1]
        path = Path(str(resources.files("cullmt_ray") / "reference" / "models" / which))
        if which not in REFERENCE_MODELS or not (path / "config.json").exists():
            shipped = [m for m in REFERENCE_MODELS if (path.parent / m / "config.json").exists()]
            raise FamilyError(f"model {name!r} is not shipped; available: "
                              f"{', '.join('reference:' + m for m in shipped) or 'none'}")
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise FamilyError(f"model {name!r}: no such model folder (expected a directory with config.json, "
                              "a hub name like facebook/nllb-200-distilled-600M, or reference:dense)")
        return str(path)
    return name


def model_fingerprint(name: str) -> str:
    """Identity of the weights behind ``name``: for a local folder, a hash of its config and the
    size and first MiB of each weight file (so retraining in place never reuses stale scores);
    for a hub name, the name itself (plus the revision a user pins in it)."""
    import hashlib

    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return name
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
    return f"{name}#{h.hexdigest()[:12]}"


SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored_dtype(model_name: str) -> str:
    """The dtype the base model's weights are stored in (its config's ``dtype``), float32 if unknown."""
    import json

    path = Path(resolve_model_path(model_name))
    try:
        conf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    d = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    return d if d in SAVE_DTYPES else "float32"


def _device_and_dtype(spec: ModelConfig) -> tuple[str, torch.dtype]:
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if spec.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif spec.dtype in names:
        dtype = names[spec.dtype]
    else:
        raise FamilyError(f"model.dtype={spec.dtype!r}: expected auto, float32, bfloat16 or float16")
    return device, dtype


def family_class(config) -> type[ModelFamily]:
    """The family of a model from its ``config.json`` alone (no weights loaded)."""
    if "moe" in getattr(config, "model_type", ""):
        return NllbMoeFamily
    return EncoderDecoderFamily if config.is_encoder_decoder else DecoderOnlyFamily


def model_units(spec: ModelConfig) -> tuple[type[ModelFamily], list[str]]:
    """(family, units) of a model, read on the driver from its config only."""
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(resolve_model_path(spec.name), trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise FamilyError(f"model.name={spec.name!r}: not a local model folder, and the hub could not "
                          f"provide it ({str(e).splitlines()[0][:120]})") from None
    cls = FAMILIES[spec.family] if spec.family != "auto" else family_class(conf)
    return cls, cls.config_units(conf)


def load_family(spec: ModelConfig) -> ModelFamily:
    """Load model + tokenizer and wrap them in the family that fits (or the one named)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    path = resolve_model_path(spec.name)
    if spec.family not in ("auto", *FAMILIES):
        raise FamilyError(f"model.family={spec.family!r}: expected auto or one of {', '.join(FAMILIES)}")
    device, dtype = _device_and_dtype(spec)
    kw = {"trust_remote_code": spec.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise FamilyError(f"model {spec.name!r} could not be loaded as a local path or hub name "
                          f"({str(e).splitlines()[0][:160]})") from None
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    if "moe" in getattr(config, "model_type", ""):
        from .moe import load_pruned_moe

        model = load_pruned_moe(path, dtype=dtype, **kw).to(device)  # corrected dispatch; pruned exports too
    else:
        model = auto.from_pretrained(path, dtype=dtype, **kw).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if spec.family != "auto":
        cls = FAMILIES[spec.family]
    else:
        fits = [c for c in FAMILIES.values() if c.matches(model)]
        if not fits:
            raise FamilyError(f"model {spec.name!r} ({type(model).__name__}) fits no family; "
                              f"expected one of {', '.join(FAMILIES)}")
        cls = fits[0]
    if cls is DecoderOnlyFamily:
        return cls(model, tokenizer, spec.name, prompt_template=spec.prompt_template)
    return cls(model, tokenizer, spec.name)
