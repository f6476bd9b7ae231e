"""Train a reference translation model from scratch on Multi30k (torchtune-style recipe).

Usage:
    python recipes/train_reference.py --config recipes/configs/dense.yaml [--max-steps N]

The YAML names the architecture (``m2m100`` | ``nllb_moe`` | ``llama``), its size, the
directions, and the optimisation. Checkpoints go to ``checkpoint_dir`` every
``checkpoint_every`` steps; running the same command again resumes from the latest one.
The checkpoint with the best validation BLEU (Multi30k ``val``, never ``test``) is exported
as fp16 safetensors to ``output_dir`` together with the tokenizer, loadable by plain
``transformers``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import sacrebleu
import torch
import yaml
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cullmt_ray.data import read_lines
from cullmt_ray.languages import name as lang_name


# ----------------------------------------------------------------------------- model
def build_model(cfg: dict, tok) -> torch.nn.Module:
    arch, m = cfg["arch"], dict(cfg["model"])
    common = dict(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if arch == "m2m100":
        from transformers import M2M100Config, M2M100ForConditionalGeneration

        conf = M2M100Config(decoder_start_token_id=tok.eos_token_id, encoder_layerdrop=0.0,
                            decoder_layerdrop=0.0, max_position_embeddings=256, **common, **m)
        return M2M100ForConditionalGeneration(conf)
    if arch == "nllb_moe":
        from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

        from cullmt_ray.families import nllb_moe_fix

        nllb_moe_fix.install()  # transformers' stock dispatch never runs experts 2+ (see that module)

        conf = NllbMoeConfig(decoder_start_token_id=tok.eos_token_id, encoder_layerdrop=0.0,
                             decoder_layerdrop=0.0, max_position_embeddings=256,
                             output_router_logits=True, **common, **m)
        return NllbMoeForConditionalGeneration(conf)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(max_position_embeddings=512, tie_word_embeddings=True, **common, **m)
        return LlamaForCausalLM(conf)
    raise SystemExit(f"unknown arch {arch!r}: expected m2m100, nllb_moe or llama")


def init_from_dense(model: torch.nn.Module, cfg: dict) -> None:
    """Sparse upcycling (``init_from`` in the config, NLLB-MoE only): see ``upcycle.py``."""
    from transformers import AutoModelForSeq2SeqLM
    from upcycle import upcycle

    ini = cfg["init_from"]
    if cfg["arch"] != "nllb_moe":
        raise SystemExit(f"init_from: only for arch nllb_moe, not {cfg['arch']!r}")
    dense = AutoModelForSeq2SeqLM.from_pretrained(ini["model"], dtype=torch.float32)
    try:
        counts = upcycle(model, dense, ini["encoder_layers"], ini["decoder_layers"],
                         float(ini.get("expert_noise", 0.0)), cfg.get("seed", 0), float(ini.get("expert_drop", 0.0)))
    except (ValueError, KeyError) as e:
        raise SystemExit(str(e).strip("'\"")) from None
    print(f"initialised from {ini['model']} (encoder layers {ini['encoder_layers']}, decoder layers "
          f"{ini['decoder_layers']}): {counts}", flush=True)


# ----------------------------------------------------------------------------- data
def load_pairs(cfg: dict, split: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(src_code, tgt_code, src_lines, tgt_lines) for every configured direction."""
    d = Path(cfg["data"]["dir"])
    files = cfg["data"]["files"]  # NLLB code -> file suffix
    limit = cfg["data"].get("limit") if split == "train" else None  # smoke runs: first N lines only
    text = {c: read_lines(d / f"{split}.{suffix}.gz")[:limit] for c, suffix in files.items()}
    return [(s, t, text[s], text[t]) for s, t in (x.split("-") for x in cfg["data"]["directions"])]


def llama_prompt(src_code: str, tgt_code: str, src: str) -> str:
    """The prompt the reference Llama is trained with (and that the decoder family uses)."""
    return f"{lang_name(src_code)}: {src}\n{lang_name(tgt_code)}:"


def encode_examples(cfg: dict, tok, split: str) -> list[tuple[list[int], list[int]]]:
    """Token-id examples: (input_ids, labels) for enc-dec; (ids, loss mask as labels) for llama."""
    out: list[tuple[list[int], list[int]]] = []
    max_len = cfg["data"].get("max_len", 128)
    for src_code, tgt_code, srcs, tgts in load_pairs(cfg, split):
        if cfg["arch"] == "llama":
            prompts = tok([llama_prompt(src_code, tgt_code, s) for s in srcs], add_special_tokens=False)
            targets = tok([" " + t for t in tgts], add_special_tokens=False)
            for p, t in zip(prompts["input_ids"], targets["input_ids"]):
                p = [tok.bos_token_id] + p
                t = t + [tok.eos_token_id]
                if len(p) + len(t) <= max_len:
                    out.append((p + t, [-100] * len(p) + t))
        else:
            tok.src_lang, tok.tgt_lang = src_code, tgt_code
            enc = tok(srcs, text_target=tgts)
            for s, t in zip(enc["input_ids"], enc["labels"]):
                if len(s) <= max_len and len(t) <= max_len:
                    out.append((s, t))
    return out


def make_batches(examples, max_tokens: int, seed: int) -> list[list[int]]:
    """Length-bucketed batches of example indices with about ``max_tokens`` target tokens each."""
    rng = random.Random(seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    idx.sort(key=lambda i: (len(examples[i][1]), len(examples[i][0])))
    batches, cur, cur_max = [], [], 0
    for i in idx:
        n = max(len(examples[i][0]), len(examples[i][1]))
        if cur and max(cur_max, n) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(examples, batch: list[int], pad_id: int, arch: str) -> dict[str, torch.Tensor]:
    def pad(seqs, value):
        n = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (n - len(s)) for s in seqs])

    srcs = [examples[i][0] for i in batch]
    tgts = [examples[i][1] for i in batch]
    if arch == "llama":
        ids = pad(srcs, pad_id)
        return {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "labels": pad(tgts, -100)}
    ids = pad(srcs, pad_id)
    return {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "labels": pad(tgts, -100)}


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def validate(cfg: dict, model, tok, n: int) -> dict[str, float]:
    """Greedy-decode the first ``n`` val sentences per direction; BLEU per direction and mean."""
    model.eval()
    scores = {}
    for src_code, tgt_code, srcs, tgts in load_pairs(cfg, "val"):
        hyps = translate(cfg["arch"], model, tok, src_code, tgt_code, srcs[:n])
        scores[f"{src_code}-{tgt_code}"] = sacrebleu.corpus_bleu(hyps, [tgts[:n]]).score
    scores["mean"] = sum(scores.values()) / len(scores)
    model.train()
    return scores


def translate(arch: str, model, tok, src_code: str, tgt_code: str, srcs: list[str], bs: int = 64) -> list[str]:
    out: list[str] = []
    for i in range(0, len(srcs), bs):
        chunk = srcs[i : i + bs]
        if arch == "llama":
            tok.padding_side = "left"
            enc = tok([llama_prompt(src_code, tgt_code, s) for s in chunk], return_tensors="pt",
                      padding=True, add_special_tokens=False)
            ids = torch.cat([torch.full((len(chunk), 1), tok.bos_token_id), enc["input_ids"]], 1)
            mask = torch.cat([torch.ones(len(chunk), 1, dtype=torch.long), enc["attention_mask"]], 1)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=96, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out += [t.strip() for t in tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)]
        else:
            tok.src_lang = src_code
            enc = tok(chunk, return_tensors="pt", padding=True)
            gen = model.generate(**enc, forced_bos_token_id=tok.convert_tokens_to_ids(tgt_code),
                                 max_new_tokens=96, num_beams=1, do_sample=False)
            out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


# ----------------------------------------------------------------------------- train
def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def export(model, tok, out_dir: Path, card: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.float16)
    half.config.dtype = "float16"
    half.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(card, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    opt_cfg = cfg["train"]
    torch.manual_seed(cfg.get("seed", 0))
    torch.set_num_threads(opt_cfg.get("threads", os.cpu_count() or 1))

    tok = AutoTokenizer.from_pretrained(cfg["tokenizer"])
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg['arch']}: {n_params / 1e6:.2f}M parameters", flush=True)
    examples = encode_examples(cfg, tok, "train")
    print(f"{len(examples)} training examples", flush=True)

    optim = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"], betas=(0.9, 0.98),
                              weight_decay=opt_cfg.get("weight_decay", 0.01))
    ckpt_dir = Path(cfg["checkpoint_dir"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -1.0, "history": [], "seconds": 0.0,
             "tokens": 0}
    last = ckpt_dir / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=True)  # tensors and plain types only: no code runs
        model.load_state_dict(ck["model"])
        optim.load_state_dict(ck["optim"])
        state = json.loads(ck["state"])
        print(f"resumed from {last} at step {state['step']}", flush=True)
    elif cfg.get("init_from"):  # upcycle, and validate the starting point
        init_from_dense(model, cfg)
        scores = validate(cfg, model, tok, opt_cfg.get("eval_sentences", 200))
        state["history"].append({"step": 0, **scores})
        print(f"val BLEU at step 0: {json.dumps(scores)}", flush=True)

    epochs = opt_cfg["epochs"]
    steps_per_epoch = len(make_batches(examples, opt_cfg["max_tokens"], 0))
    total = epochs * steps_per_epoch
    if opt_cfg.get("max_steps"):  # a shorter schedule (the learning rate still decays to the end)
        total = min(total, int(opt_cfg["max_steps"]))
    max_steps = args.max_steps if args.max_steps is not None else total
    if opt_cfg["warmup"] >= total:
        raise SystemExit(f"train.warmup={opt_cfg['warmup']}: expected fewer steps than the schedule's {total} "
                         "(the learning rate would never decay)")
    use_bf16 = opt_cfg.get("bf16", True)
    smoothing = opt_cfg.get("label_smoothing", 0.1)
    aux = cfg["arch"] == "nllb_moe"
    model.train()
    t0 = time.time()
    while state["step"] < min(total, max_steps):
        batches = make_batches(examples, opt_cfg["max_tokens"], cfg.get("seed", 0) + state["epoch"])
        for b in batches[state["batch_in_epoch"] :]:
            batch = collate(examples, b, tok.pad_token_id, cfg["arch"])
            for g in optim.param_groups:
                g["lr"] = lr_at(state["step"], opt_cfg["lr"], opt_cfg["warmup"], total)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                labels = batch.pop("labels")
                extra = {} if cfg["arch"] == "llama" else {"decoder_input_ids": shift_right(labels, tok)}
                if aux:
                    extra.update(labels=labels, output_router_logits=True)
                out = model(**batch, **extra)
                logits = out.logits.float()
                if cfg["arch"] == "llama":
                    logits, labels = logits[:, :-1], labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                    label_smoothing=smoothing)
                if aux:
                    loss = loss + out.encoder_aux_loss * model.config.router_aux_loss_coef \
                        + out.decoder_aux_loss * model.config.router_aux_loss_coef
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.get("clip", 1.0))
            optim.step()
            optim.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            state["tokens"] += int((labels != -100).sum())
            if state["step"] % 50 == 0:
                el = state["seconds"] + time.time() - t0
                print(f"step {state['step']}/{total} epoch {state['epoch']} loss {loss.item():.3f} "
                      f"lr {optim.param_groups[0]['lr']:.2e} tok/s {state['tokens'] / el:.0f}", flush=True)
            done = state["step"] >= min(total, max_steps)
            if state["step"] % opt_cfg["eval_every"] == 0 or done:
                scores = validate(cfg, model, tok, opt_cfg.get("eval_sentences", 200))
                state["history"].append({"step": state["step"], **scores})
                print(f"val BLEU at step {state['step']}: {json.dumps(scores)}", flush=True)
                if scores["mean"] > state["best"]:
                    state["best"] = scores["mean"]
                    card = {"arch": cfg["arch"], "parameters": n_params, "config": cfg, "steps_per_epoch": steps_per_epoch,
                            **state,
                            "seconds": state["seconds"] + time.time() - t0}
                    export(model, tok, Path(cfg["output_dir"]), card)
                    print(f"exported best (val mean BLEU {scores['mean']:.2f}) to {cfg['output_dir']}", flush=True)
            if state["step"] % opt_cfg["checkpoint_every"] == 0 or done:
                state["seconds"] += time.time() - t0
                t0 = time.time()
                tmp = last.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "state": json.dumps(state)}, tmp)
                os.replace(tmp, last)
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    print(f"finished at step {state['step']}; best val mean BLEU {state['best']:.2f}", flush=True)


def shift_right(labels: torch.Tensor, tok) -> torch.Tensor:
    """Decoder inputs: </s> (NLLB's decoder start) followed by the labels minus their last token."""
    dec = labels.new_full(labels.shape, tok.pad_token_id)
    dec[:, 0] = tok.eos_token_id
    dec[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, tok.pad_token_id)
    return dec


if __name__ == "__main__":
    main()
