"""Model families and loading: hub name or local path, fp32 on CPU, bf16 on GPU."""

from __future__ import annotations

import torch

from .. import model_files
from ..config import ModelConfig
from ..model_files import FamilyError, model_fingerprint, resolve_model_path, stored_dtype
from .base import ModelFamily, Size
from .decoder import DecoderOnlyFamily
from .encdec import EncoderDecoderFamily
from .moe import NllbMoeFamily

FAMILIES: dict[str, type[ModelFamily]] = {
    EncoderDecoderFamily.name: EncoderDecoderFamily,
    DecoderOnlyFamily.name: DecoderOnlyFamily,
    NllbMoeFamily.name: NllbMoeFamily,
}
__all__ = ["FAMILIES", "FamilyError", "ModelFamily", "Size", "load_family", "model_units", "model_fingerprint",
           "resolve_model_path", "stored_dtype"]

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def model_units(spec: ModelConfig) -> tuple[type[ModelFamily], list[str]]:
    """(family, units) of a model, read from its config only (:func:`cullmt_ray.model_files.model_units`)."""
    name, units = model_files.model_units(spec.name, spec.family, spec.trust_remote_code)
    return FAMILIES[name], units


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
