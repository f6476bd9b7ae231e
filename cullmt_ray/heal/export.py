"""Export a healed candidate: merge the LoRA adapter, save model + tokenizer + a model card.

The folder loads with plain ``transformers`` (``AutoModelForSeq2SeqLM`` / ``AutoModelForCausalLM``
``.from_pretrained``); ``cullmt_ray.json`` beside the weights holds the same facts as the card,
machine-readable. Optionally the unmerged adapter is kept too, with the pruned base it applies to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ModelConfig
from ..families import ModelFamily, load_family

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def merged_family(spec: ModelConfig, removed: list[str], adapter_dir: str | Path) -> Iterator[ModelFamily]:
    """The model without ``removed``, with the adapter in ``adapter_dir`` merged into its weights (fp32, CPU).

    Inside the context ``family.model`` is the pruned, merged model; ``family.translate`` uses it.
    """
    from peft import PeftModel

    family = load_family(replace(spec, device="cpu", dtype="float32"))
    with family.apply(removed) as model:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        merged = peft_model.merge_and_unload()
        assert merged is family.model
        yield family


def _replace_dir(tmp: Path, out: Path) -> None:
    from ..atomic import honour_umask

    honour_umask(tmp)  # mkdtemp made it 0700
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def save_merged(family: ModelFamily, out_dir: str | Path, dtype: str) -> dict:
    """Save ``family``'s (pruned, merged) model at ``dtype`` + tokenizer into ``out_dir``, atomically.

    The in-memory model afterwards holds exactly the saved weights (rounded to ``dtype``, back in fp32),
    so translations in memory equal those of the reloaded folder. Returns params and bytes.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model = family.model
    try:
        model.to(DTYPES[dtype])
        model.config.dtype = dtype
        model.save_pretrained(tmp, safe_serialization=True)
        family.tokenizer.save_pretrained(tmp)
        model.to(torch.float32)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"params": params, "bytes": params * DTYPES[dtype].itemsize, "file_bytes": files, "dtype": dtype}


def save_adapter(adapter_dir: str | Path, out_dir: str | Path, pruned_dir: Path) -> None:
    """Copy the unmerged adapter; its config points at the pruned base model saved in ``pruned_dir``."""
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in Path(adapter_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        conf = json.loads((tmp / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = str(pruned_dir.resolve())
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
