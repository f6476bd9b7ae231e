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
import yaml

from ..atomic import write_json, write_text
from ..families import ModelFamily, ModelSpec, load_family, resolve_model_path
from ..families.base import unit_sort_key, unit_stack
from ..families.decoder import DecoderOnlyFamily

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored_dtype(model_name: str) -> str:
    """The dtype the base model's weights are stored in (its config's ``dtype``), float32 if unknown."""
    path = Path(resolve_model_path(model_name))
    try:
        conf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    d = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    return d if d in DTYPES else "float32"


@contextmanager
def merged_family(spec: ModelSpec, removed: list[str], adapter_dir: str | Path) -> Iterator[ModelFamily]:
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


# ----------------------------------------------------------------------------- the card
LOAD_SEQ2SEQ = """from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{path}", src_lang="{src}")
model = AutoModelForSeq2SeqLM.from_pretrained("{path}")
out = model.generate(**tok(["{sentence}"], return_tensors="pt"),
                     forced_bos_token_id=tok.convert_tokens_to_ids("{tgt}"))
print(tok.batch_decode(out, skip_special_tokens=True))"""

LOAD_CAUSAL = """from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
# prompt it as the base model was prompted (cullmt-ray's decoder family: model.prompt_template)"""


def _score_table(scores: dict, metrics: list[str]) -> str:
    """Rows per direction and mean; columns: each metric before pruning / after pruning / after healing."""
    stages = [s for s in ("before_pruning", "after_pruning", "after_healing") if s in scores]
    head = "| direction | " + " | ".join(f"{m} {s.replace('_', ' ')}" for m in metrics for s in stages) + " |"
    sep = "| --- |" + " ---: |" * (len(metrics) * len(stages))
    dirs = [d for d in scores[stages[0]]["metrics"][metrics[0]] if d != "mean"] + ["mean"]
    rows = [f"| {d} | " + " | ".join(f"{scores[s]['metrics'][m].get(d, float('nan')):.2f}"
                                     for m in metrics for s in stages) + " |" for d in dirs]
    return "\n".join([head, sep, *rows])


def _adapted(lora: dict, info: dict) -> str:
    """Where the adapters sat: every layer, or the kept layers of the stacks that lost some."""
    if lora.get("stacks", "all") != "pruned":
        return "every layer"
    stacks = sorted({unit_stack(u) for u in info["removed_units"]})
    return "the kept " + " and ".join(f"`{p}.*`" for p in stacks) + " layers"


def _loss_text(t: dict) -> str:
    """The training loss in words, from the recipe's ``train`` section."""
    parts = []
    if t.get("word_kd", 0) < 1:
        ls = f", label smoothing {t['label_smoothing']}" if t.get("label_smoothing") else ""
        parts.append(f"{1 - t.get('word_kd', 0):g} x cross-entropy on the targets{ls}")
    if t.get("word_kd"):
        parts.append(f"{t['word_kd']:g} x token-level KL to the unpruned model")
    if t.get("hidden_kd"):
        parts.append(f"{t['hidden_kd']:g} x relative squared error to its final hidden states")
    drop = "on" if t.get("model_dropout", True) else "off"
    return f"{' + '.join(parts)}; the frozen model's dropout {drop}"


def card_markdown(info: dict) -> str:
    """README.md of an exported healed model from its ``cullmt_ray.json`` facts."""
    sizes, scores, train = info["size"], info["scores"], info["training"]
    metrics = list(info["signatures"])
    primary = info["primary_metric"]
    path = info["model_dir"]
    d0 = info["directions"][0].split("-")
    snippet = (LOAD_CAUSAL if info["family"] == DecoderOnlyFamily.name else LOAD_SEQ2SEQ).format(
        path=path, src=d0[0], tgt=d0[1], sentence="A dog runs on the beach.")
    rec = info.get("recovered", {})
    rec_lines = "\n".join(f"- {m}: pruning lost {r['lost']:.2f}, healing changed it by {r['gained']:+.2f}"
                          + (f" ({r['fraction'] * 100:.0f}% of the loss recovered)" if r.get("fraction") is not None
                             else "") for m, r in rec.items())
    sigs = "\n".join(f"- {m}: `{s}`" for m, s in info["signatures"].items())
    hist = [h for h in train.get("history", []) if f"val_{primary}" in h]
    kl = any("val_kl" in h for h in hist)
    hist_rows = "\n".join((f"| {h['step']} | {h['train_loss']:.4f} | " if "train_loss" in h else f"| {h['step']} | - | ")
                          + f"{h[f'val_{primary}']:.2f} | {h['val_ref_loss']:.4f} | {h['val_kd_loss']:.4f} |"
                          + (f" {h.get('val_kl', float('nan')):.5f} |" if kl else "") for h in hist)
    kl_head = (" KL to the unpruned model |", " ---: |") if kl else ("", "")
    lora = info["heal_config"]["lora"]
    dtype = sizes["healed"]["dtype"]
    itemsize = DTYPES[dtype].itemsize
    front = {"library_name": "transformers", "tags": ["translation", "pruned", "lora-healed", "cullmt-ray"]}
    if not Path(info["base_model"].split("#")[0]).exists() and not info["base_model"].startswith("reference:"):
        front["base_model"] = info["base_model"]
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {info['base_model']} without {', '.join(info['removed_units'])}, healed

Made by cullmt-ray: {len(info['removed_units'])} of {info['units_total']} {info['family']} layers removed
(`{' '.join(info['removed_units'])}`), chosen by the search in `{info['run_dir']}`, then healed with
LoRA (r={lora['r']}, alpha={lora['alpha']}, targets {', '.join(info['lora_targets'])} in {_adapted(lora, info)}) fine-tuned on
{train['pairs']:,} sentence pairs ({info['mix_description']}) and merged into the weights.

## Size

| model | parameters | bytes at {dtype} |
| --- | ---: | ---: |
| before pruning | {sizes['before_pruning']['params']:,} | {sizes['before_pruning']['params'] * itemsize:,} |
| after pruning and healing (this folder; the merged adapter adds nothing) | {sizes['healed']['params']:,} | {sizes['healed']['bytes']:,} |

{100 * (1 - sizes['healed']['params'] / sizes['before_pruning']['params']):.1f}% fewer parameters; the weights
file takes {sizes['healed']['file_bytes'] / 2**20:.1f} MiB.

## Scores

On {info['evaluation']['source']} ({info['evaluation']['sentences']} sentences per direction), primary
metric {primary}:

{_score_table(scores, metrics)}

{rec_lines}

Signatures (sacrebleu):
{sigs}

## Training

{train['steps']} steps ({train['epochs']:.2f} epochs of {train['pairs']:,} pairs) on {train['workers']} Ray Train
worker(s), {train['seconds']:.0f} s; {train['trainable_params']:,} trainable LoRA parameters; worker restarts:
{train['restarts']}. Loss: {_loss_text(info['heal_config']['train'])}.
Validation on {info['validation']['source']} ({info['validation']['sentences']} sentences per direction):

| step | train loss | val {primary} | val loss (references) | val loss (teacher) |{kl_head[0]}
| ---: | ---: | ---: | ---: | ---: |{kl_head[1]}
{hist_rows}

## Use

```python
{snippet}
```

## Configuration

The heal recipe:

```yaml
{yaml.safe_dump(info['heal_config'], sort_keys=False).strip()}
```

The search that chose the prune set (`{info['run_dir']}/config.yaml`):

```yaml
{yaml.safe_dump(info['search_config'], sort_keys=False).strip()}
```
"""


def write_card(model_dir: str | Path, info: dict) -> None:
    out = Path(model_dir)
    write_json(out / "cullmt_ray.json", info)
    write_text(out / "README.md", card_markdown(info))


def sorted_units(units) -> list[str]:
    return sorted(units, key=unit_sort_key)
