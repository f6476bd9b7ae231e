"""Expert scores and selection from gate statistics (arXiv 2212.09811, "Memory-efficient NLLB-200").

Statistics come per direction from :meth:`NllbMoeFamily.gate_stats` (via the evaluator actors):
per sparse layer, tokens, top-1/top-2 counts, summed gate probability and importance. Encoder
layers are attributed to the source language, decoder layers to the target language.

Scores per expert (higher = keep):
- ``activity``: share of tokens for which the expert is in the top 2;
- ``importance``: sum over its top-1 tokens of exp(top-1 probability), normalised by tokens;
- ``top1``: share of tokens routed to it first;
- ``mean_prob``: its mean gate probability.

Selection keeps a fraction of all experts, split between encoder and decoder by ``enc_dec_ratio``
(3:1 in the paper: encoder experts are pruned less), either the same number in every layer of a
side (``per_layer``) or the best scores over the side's layers after normalising each layer's
scores to sum 1 (``global``) with at least ``min_per_layer`` per layer. Granularity: ``language``
(encoder experts of the source language, decoder experts of the target language, i.e. the union
of the source's and the target's experts) or ``pair`` (statistics of that direction only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .units import expert_unit

SCORES = ("importance", "activity", "top1", "mean_prob")


@dataclass(frozen=True)
class Selection:
    """How to turn scores into a kept set."""

    keep_fraction: float = 0.5
    score: str = "importance"
    mode: str = "global"  # global | per_layer
    min_per_layer: int = 1
    enc_dec_ratio: float = 3.0  # kept encoder experts : kept decoder experts
    granularity: str = "language"  # language | pair

    def check(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"experts.score={self.score!r}: expected one of {', '.join(SCORES)}")
        if self.mode not in ("global", "per_layer"):
            raise ValueError(f"experts.mode={self.mode!r}: expected global or per_layer")
        if self.granularity not in ("language", "pair"):
            raise ValueError(f"experts.granularity={self.granularity!r}: expected language or pair")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"experts.keep_fraction={self.keep_fraction}: expected a fraction in (0, 1]")
        if self.enc_dec_ratio <= 0:
            raise ValueError(f"experts.enc_dec_ratio={self.enc_dec_ratio}: expected > 0")


def merge(stats: list[dict]) -> dict:
    """Sum per-layer statistics of several runs (the same layers)."""
    out: dict = {}
    for st in stats:
        for layer, a in st["layers"].items():
            o = out.setdefault(layer, {k: (np.zeros(len(v)) if isinstance(v, list) else 0) for k, v in a.items()})
            for k, v in a.items():
                o[k] = o[k] + (np.asarray(v, dtype=float) if isinstance(v, list) else v)
    return out


def side_stats(by_direction: dict[str, dict], src: str, tgt: str, granularity: str) -> dict:
    """Per layer, the statistics that decide the experts for ``src -> tgt``."""
    pair = f"{src}-{tgt}"
    enc_dirs = [d for d in by_direction if (d == pair if granularity == "pair" else d.split("-")[0] == src)]
    dec_dirs = [d for d in by_direction if (d == pair if granularity == "pair" else d.split("-")[1] == tgt)]
    if not enc_dirs or not dec_dirs:
        raise ValueError(f"no gate statistics for {pair} at granularity {granularity!r}; "
                         f"collected: {', '.join(by_direction)}")
    enc = merge([by_direction[d] for d in enc_dirs])
    dec = merge([by_direction[d] for d in dec_dirs])
    return {layer: (enc if layer.startswith("enc") else dec)[layer] for layer in enc}


def expert_scores(layer_stats: dict, score: str) -> np.ndarray:
    tokens = max(layer_stats["tokens"], 1)
    if score == "importance":
        return np.asarray(layer_stats["importance"]) / tokens
    if score == "activity":
        return (np.asarray(layer_stats["top1"]) + np.asarray(layer_stats["top2"])) / tokens
    if score == "top1":
        return np.asarray(layer_stats["top1"]) / tokens
    return np.asarray(layer_stats["prob_sum"]) / tokens


def select(stats: dict, present: dict[str, list[int]], sel: Selection) -> list[str]:
    """Units to remove (``enc.L.expert.E``) so that ``sel.keep_fraction`` of the experts stay."""
    sel.check()
    total = sum(len(v) for v in present.values())
    keep_total = max(1, round(sel.keep_fraction * total))
    sides = {s: [layer for layer in present if layer.startswith(s)] for s in ("enc", "dec")}
    enc_share = sel.enc_dec_ratio / (sel.enc_dec_ratio + 1)
    budget = {"enc": round(keep_total * enc_share) if sides["dec"] else keep_total}
    budget["dec"] = keep_total - budget["enc"]
    removed: list[str] = []
    for side, layers in sides.items():
        if not layers:
            continue
        floor = {layer: min(sel.min_per_layer, len(present[layer])) for layer in layers}
        room = sum(len(present[layer]) for layer in layers)
        want = min(max(budget[side], sum(floor.values())), room)
        scores = {layer: expert_scores(stats[layer], sel.score)[present[layer]] for layer in layers}
        if sel.mode == "per_layer":
            per = max(sel.min_per_layer, math.floor(want / len(layers)))
            extra = want - per * len(layers)  # left over: one more in the first layers
            quota = {layer: min(len(present[layer]), per + (1 if i < extra else 0)) for i, layer in enumerate(layers)}
            keep = {layer: _top(scores[layer], quota[layer]) for layer in layers}
        else:
            norm = {layer: s / s.sum() if s.sum() > 0 else np.full(len(s), 1 / len(s)) for layer, s in scores.items()}
            keep = {layer: _top(norm[layer], floor[layer]) for layer in layers}
            rest = sorted(((float(norm[layer][i]), layer, i) for layer in layers for i in range(len(present[layer]))
                           if i not in keep[layer]), key=lambda t: (-t[0], t[1], t[2]))
            for _, layer, i in rest[: max(0, want - sum(len(k) for k in keep.values()))]:
                keep[layer].add(i)
        for layer in layers:
            removed += [expert_unit(layer, e) for i, e in enumerate(present[layer]) if i not in keep[layer]]
    return removed


def _top(scores: np.ndarray, k: int) -> set[int]:
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return set(order[:k])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0
