"""Write a reference model's card (README.md beside its weights) from its training record and
the scores that ``cullmt-ray evaluate --json`` measured on Multi30k test_2016_flickr.

Usage:
    python recipes/model_card.py --model cullmt_ray/reference/models/dense \
        --config recipes/configs/dense.yaml --scores results/reference/dense_test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from cullmt_ray.card import load_snippet, signature_lines

ARCH_NAMES = {"m2m100": "NLLB dense (M2M100ForConditionalGeneration)",
              "nllb_moe": "NLLB-MoE (NllbMoeForConditionalGeneration)",
              "llama": "Llama (LlamaForCausalLM), prompt-based translation"}

TOKEN_USE = {False: "the target language token is forced as the first generated token",
             True: "this decoder-only model uses no language tokens: it translates from the prompt "
                   "'{Source}: {text}\\n{Target}:' and stops at the end of the line"}

def card(model_dir: Path, config_path: Path, scores: dict, target: float | None, remark: str = "") -> str:
    train = json.loads((model_dir / "training.json").read_text())
    cfg = yaml.safe_load(config_path.read_text())
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    base = scores["results"][0]
    metrics = list(base["metrics"])
    dirs = [d for d in base["metrics"][metrics[0]] if d != "mean"]
    rows = "\n".join(f"| {d} | " + " | ".join(f"{base['metrics'][m][d]:.2f}" for m in metrics) + " |"
                     for d in dirs + ["mean"])
    hist_dirs = [d for d in (train["history"][0] if train.get("history") else {}) if d != "step"]
    history = "| step | " + " | ".join(hist_dirs) + " |\n| --- |" + " --- |" * len(hist_dirs) + "\n" + "\n".join(
        f"| {h['step']} | " + " | ".join(f"{h[d]:.2f}" for d in hist_dirs) + " |" for h in train.get("history", []))
    hit = ""
    if target is not None:
        mean_bleu = base["metrics"]["bleu"]["mean"]
        hit = (f"\n**Target** (mean BLEU >= {target} over the English-centric directions): "
               f"{'met' if mean_bleu >= target else 'MISSED'} with {mean_bleu:.2f}.\n")
    epochs = (f"{train['step'] / train['steps_per_epoch']:.2f}" if train.get("steps_per_epoch")
              else cfg["train"]["epochs"])
    sigs = signature_lines(scores["signatures"])
    model_cfg = "\n".join(f"  {k}: {v}" for k, v in cfg["model"].items())
    ini = cfg.get("init_from")
    origin = ("trained from scratch by cullmt-ray" if not ini else
              f"trained by cullmt-ray, started (sparse upcycling, `recipes/upcycle.py`) from `{ini['model']}`, "
              "itself trained from scratch")
    init_line = "" if not ini else (
        f"- **Initialisation:** encoder layers {ini['encoder_layers']} and decoder layers {ini['decoder_layers']} "
        f"of `{ini['model']}` with its embeddings; each expert a copy of its layer's feed-forward block"
        + (f" with a different {ini['expert_drop']:.0%} of its hidden units re-initialised (Drop-Upcycling)"
           if ini.get("expert_drop") else "")
        + (f", times (1 + {ini['expert_noise']} N(0, 1))" if ini.get("expert_noise") else "")
        + "; routers initialised fresh. Validation at step 0 is this starting point.\n")
    return f"""# cullmt-ray reference model: {model_dir.name}

A small multilingual translation model {origin}, shipped so that the
embedded default works offline and on CPU. It is a research artefact for pruning experiments,
not a production translator.

- **Architecture:** {ARCH_NAMES.get(train['arch'], train['arch'])}, {train['parameters'] / 1e6:.2f}M parameters,
  weights in fp16 safetensors ({size / 2**20:.1f} MiB). Configuration:
```
{model_cfg}
```
- **Tokenizer:** SentencePiece (BPE, 6,000 pieces) over Multi30k train in all four languages, as
  an NLLB-style `NllbTokenizer` (`src_lang`/`tgt_lang` = `eng_Latn`, `deu_Latn`, `fra_Latn`,
  `ces_Latn`; {TOKEN_USE[train['arch'] == 'llama']}).
- **Data:** Multi30k task 1 train (29,000 captions, 4-way parallel), directions
  {', '.join(cfg['data']['directions'])}; {len(cfg['data']['directions']) * 29000:,} pairs per epoch.
  Checkpoints were picked on Multi30k `val` only; `test_2016_flickr` was never used in training.
{init_line}- **Training:** {train['step']} steps ({epochs} epoch(s) of
  ~{cfg['train']['max_tokens']} padded tokens per batch), AdamW, peak lr {cfg['train']['lr']}, cosine decay,
  label smoothing {cfg['train']['label_smoothing']}, bf16 autocast on CPU; {train['seconds'] / 60:.0f} minutes on
  2 CPU cores; best val mean BLEU {train['best']:.2f} (150 sentences per direction, greedy).

## Scores on Multi30k test_2016_flickr ({scores['sentences']} sentences per direction, greedy decoding)

| direction | {' | '.join(metrics)} |
| --- | {' | '.join('---' for _ in metrics)} |
{rows}
{hit}{f"{chr(10)}**Note:** {remark}{chr(10)}" if remark else ""}
Signatures (sacrebleu {scores['signatures'][metrics[0]].split('version:')[-1]}):
{sigs}

## Reproduce

```bash
python recipes/train_tokenizer.py --config recipes/configs/tokenizer.yaml      # once, ~10 s
{"python recipes/train_reference.py --config recipes/configs/dense.yaml          # the model it starts from" + chr(10) if ini else ""}python recipes/train_reference.py --config {config_path}                        # resumable
cullmt-ray evaluate --model reference:{model_dir.name} --dev ../shared/data/multi30k --split test_2016_flickr \\
    --directions english-centric --max-sentences all --json results/reference/{model_dir.name}_test.json
python recipes/model_card.py --model {model_dir} --config {config_path} \\
    --scores results/reference/{model_dir.name}_test.json
```

## Validation history (Multi30k val, BLEU, {cfg['train'].get('eval_sentences', 200)} sentences per direction)

{history}

## Load it without cullmt-ray

```python
{load_snippet(train['arch'] == 'llama', str(model_dir))}
```

Licence: trained on Multi30k (research use); cullmt-ray code is Apache-2.0.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--scores", required=True, type=Path)
    ap.add_argument("--target", type=float, default=None, help="mean BLEU target to report as met/missed")
    ap.add_argument("--remark", default="", help="a plain sentence for the card, e.g. why training was short")
    args = ap.parse_args()
    text = card(args.model, args.config, json.loads(args.scores.read_text()), args.target, args.remark)
    (args.model / "README.md").write_text(text, encoding="utf-8")
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
