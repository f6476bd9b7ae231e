"""Model cards: ``README.md`` + ``cullmt_ray.json`` beside every model cullmt-ray saves (pruned, healed).

Torch-free: a card is made from the facts alone (sizes, scores with signatures, configs)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .atomic import write_json, write_text
from .units import unit_stack

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

LOAD_SEQ2SEQ = """from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{path}", src_lang="{src}")
model = AutoModelForSeq2SeqLM.from_pretrained("{path}")
out = model.generate(**tok(["{sentence}"], return_tensors="pt"),
                     forced_bos_token_id=tok.convert_tokens_to_ids("{tgt}"))
print(tok.batch_decode(out, skip_special_tokens=True))"""

LOAD_CAUSAL = """import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
prompt = "{prompt}"  # the prompt its base model was trained or used with
ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
out = model.generate(ids, max_new_tokens=40, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\\n")[0])"""


def load_snippet(causal: bool, path: str, src: str = "eng_Latn", tgt: str = "deu_Latn",
                 sentence: str = "A dog runs on the beach.") -> str:
    """Python that loads and runs a saved model with plain transformers."""
    from .languages import name

    prompt = f"{name(src)}: {sentence}\\n{name(tgt)}:"
    return (LOAD_CAUSAL if causal else LOAD_SEQ2SEQ).format(path=path, src=src, tgt=tgt, sentence=sentence,
                                                            prompt=prompt)


def signature_lines(signatures: dict[str, str]) -> str:
    return "\n".join(f"- {m}: `{s}`" for m, s in signatures.items())


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
    if t.get("layer_kd"):
        where = "every kept layer" if t.get("layer_kd_at") == "kept" else "the kept layers next to the cut"
        parts.append(f"{t['layer_kd']:g} x relative squared error to its outputs of {where}")
    drop = "on" if t.get("model_dropout", True) else "off"
    chosen = ("; the checkpoint with the lowest validation KL to the unpruned model exported"
              if t.get("select") == "val_kl" else "")
    return f"{' + '.join(parts)}; the frozen model's dropout {drop}{chosen}"


def healed_card(info: dict) -> str:
    """README.md of an exported healed model from its ``cullmt_ray.json`` facts."""
    sizes, scores, train = info["size"], info["scores"], info["training"]
    metrics = list(info["signatures"])
    primary = info["primary_metric"]
    path = info["model_dir"]
    d0 = info["directions"][0].split("-")
    snippet = load_snippet(info.get("causal", False), path, d0[0], d0[1])
    rec = info.get("recovered", {})
    rec_lines = "\n".join(f"- {m}: pruning lost {r['lost']:.2f}, healing changed it by {r['gained']:+.2f}"
                          + (f" ({r['fraction'] * 100:.0f}% of the loss recovered)" if r.get("fraction") is not None
                             else "") for m, r in rec.items())
    sigs = signature_lines(info["signatures"])
    hist = [h for h in train.get("history", []) if f"val_{primary}" in h]
    kl = any("val_kl" in h for h in hist)
    hist_rows = "\n".join((f"| {h['step']} | {h['train_loss']:.4f} | " if "train_loss" in h else f"| {h['step']} | - | ")
                          + f"{h[f'val_{primary}']:.2f} | {h['val_ref_loss']:.4f} | {h['val_kd_loss']:.4f} |"
                          + (f" {h.get('val_kl', float('nan')):.5f} |" if kl else "") for h in hist)
    kl_head = (" KL to the unpruned model |", " ---: |") if kl else ("", "")
    lora = info["heal_config"]["lora"]
    dtype = sizes["healed"]["dtype"]
    itemsize = ITEMSIZE[dtype]
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


def pruned_card(info: dict) -> str:
    """README.md of a pruned (not healed) model saved by ``cullmt-ray evaluate --export`` or ``experts --export``."""
    size, removed = info["size"], info["removed_units"]
    lines = [f"# {info['base_model']} without {', '.join(removed) or 'nothing'}", "",
             f"Made by cullmt-ray: {len(removed)} {info['family']} units removed (`{' '.join(removed)}`), weights saved "
             f"at {info.get('dtype', 'the base dtype')}: {size['params']:,} parameters, {size['bytes']:,} bytes.", ""]
    scores = {("before_pruning" if not r["removed"] else "after_pruning"): r for r in info.get("scores", [])}
    if scores and info.get("signatures"):
        lines += [f"## Scores on {info.get('dev', 'the dev set')}", "",
                  _score_table(scores, list(info["signatures"])), "", "Signatures (sacrebleu):",
                  signature_lines(info["signatures"]), ""]
    src, tgt = (info.get("directions") or ["eng_Latn-deu_Latn"])[0].split("-")
    saved = f" (it was saved with `src_lang={info['tokenizer_src_lang']}`, the last source it translated)" \
        if info.get("tokenizer_src_lang") else ""
    lines += ["## Use", "", f"The tokenizer is saved as the base model's{saved}; set `src_lang` (and force the "
              "target language token) for each direction, as below.", "", "```python",
              load_snippet(info.get("causal", False), info["model_dir"], src, tgt), "```", ""]
    extra = {k: v for k, v in info.items() if k not in ("scores", "signatures", "size", "removed_units")}
    lines += ["## Facts", "", "```yaml", yaml.safe_dump(extra, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_card(model_dir: str | Path, info: dict, markdown: str) -> None:
    """``cullmt_ray.json`` (the facts) and ``README.md`` (the card) beside a saved model, atomically."""
    out = Path(model_dir)
    write_json(out / "cullmt_ray.json", info)
    write_text(out / "README.md", markdown)
