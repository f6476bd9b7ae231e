"""Evaluating one candidate: cullmt-ray's route vs the naive one, as a ratio measured in one run.

cullmt-ray: re-slice the layer lists (no copy), renumber layer_idx, batched length-sorted greedy
decoding with the KV cache. Naive: ``copy.deepcopy`` the model, delete the layers, renumber
(without it cached generation crashes), and ``generate`` in unsorted batches of the same size.
    python bench/bench_eval.py [--model reference:dense] [--sentences 48]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import parser, save
from torch import nn

from cullmt_ray.data import load_devset
from cullmt_ray.config import Decoding, ModelConfig
from cullmt_ray.families import load_family


def naive(fam, removed: list[str], sources: list[str], src: str, tgt: str, bs: int) -> list[str]:
    model = copy.deepcopy(fam.model)
    for prefix, part in (("enc", model.model.encoder), ("dec", model.model.decoder)):
        keep = [layer for i, layer in enumerate(part.layers) if f"{prefix}.{i}" not in removed]
        part.layers = nn.ModuleList(keep)
        for j, layer in enumerate(keep):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = j
    model.config.encoder_layers = len(model.model.encoder.layers)
    model.config.decoder_layers = len(model.model.decoder.layers)
    tok = fam.tokenizer
    tok.src_lang = src
    out = []
    with torch.inference_mode():
        for i in range(0, len(sources), bs):
            enc = tok(sources[i : i + bs], return_tensors="pt", padding=True)
            gen = model.generate(**enc, forced_bos_token_id=tok.convert_tokens_to_ids(tgt), max_new_tokens=128)
            out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


def forget_own_states(fam) -> None:
    """Drop the prompt states a family kept (``keep_states``) before timing a candidate again: in a search a
    candidate is decoded once, so it never replays its own."""
    if getattr(fam, "prefix_states", None) is not None:
        fam.prefix_states.clear()


def versus_naive(fam, removed: list[str], sources: list[str], dec: Decoding,
                 repeats: int) -> tuple[list[float], list[float], int]:
    """Seconds of ours and of :func:`naive` per repeat (interleaved A/B), and how many outputs are equal."""
    ours, theirs = [], []
    for _ in range(repeats):
        forget_own_states(fam)
        t = time.perf_counter()
        with fam.apply(removed):
            a = fam.translate(sources, "eng_Latn", "deu_Latn", dec)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = naive(fam, removed, sources, "eng_Latn", "deu_Latn", dec.batch_size)
        theirs.append(time.perf_counter() - t)
    return ours, theirs, sum(x.strip() == y.strip() for x, y in zip(a, b))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fam = load_family(ModelConfig(args.model))
    fam.keep_states()  # as an evaluator actor does
    if fam.name != "encdec":
        raise SystemExit("bench_eval compares the encoder-decoder route; pass an NLLB/M2M-100 model")
    ds = load_devset("builtin:demo").subsample(args.sentences)
    sources = list(ds.lines["eng_Latn"])
    removed = [fam.units()[1], fam.units()[-2]]
    dec = Decoding(batch_size=16)
    ours, theirs, same = versus_naive(fam, removed, sources, dec, args.repeats)
    res = {"model": args.model, "removed": removed, "sentences": len(sources), "threads": 1,
           "cullmt_seconds_median": round(statistics.median(ours), 3),
           "naive_seconds_median": round(statistics.median(theirs), 3),
           "speedup": round(statistics.median(theirs) / statistics.median(ours), 2),
           "identical_outputs": f"{same}/{len(sources)}"}
    print(res)
    save("eval_vs_naive", res, args.out)


if __name__ == "__main__":
    main()
