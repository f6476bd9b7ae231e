"""Cheap proxies for a unit's importance, computed by teacher forcing on the dev set.

- ``kl``: KL(full || pruned) of the next-token distributions over the reference tokens, for the
  model with that one unit removed (one forward pass per unit, no decoding);
- ``angle``: angular distance between a layer's input and output hidden states in the full
  model (arXiv 2403.17887): a layer that barely turns its input is a candidate for removal.
  One forward pass for all units.

Both are small for a harmless unit and zero for an exact identity layer. Their rank agreement
with the real metric (drop of spBLEU/BLEU when the unit alone is removed) is measured by
``bench/bench_proxies.py``; a search can use them to order or pre-filter candidates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .families.base import ModelFamily


def _hidden(x):
    return x[0] if isinstance(x, tuple) else x


@torch.inference_mode()
def proxy_scores(family: ModelFamily, batches: list[tuple[dict, torch.Tensor]], units: list[str]) -> dict:
    """``{"kl": {unit: nats per token}, "angle": {unit: radians / pi}}`` over ``batches``.

    Each batch is ``(model inputs, target mask)`` as made by ``family.teacher_forced``.
    """
    model = family.model
    # Angular distance: hooks on every layer of the full model, one pass per batch.
    sums = {u: [0.0, 0] for u in units}
    hooks = []
    for s in family.stacks:
        for i, layer in enumerate(s.layers):
            unit = f"{s.prefix}.{i}"
            if unit not in sums:
                continue

            def hook(mod, args, kwargs, out, unit=unit, side="tgt" if s.prefix == "dec" else "src"):
                h_in = args[0] if args else kwargs["hidden_states"]
                h_out = _hidden(out)
                cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1).clamp(-1.0, 1.0)
                keep = current.get(side)  # real tokens only (target side for decoder layers)
                keep = keep if keep is not None and keep.shape == cos.shape else None
                angles = torch.arccos(cos) / math.pi
                sums[unit][0] += float(angles[keep].sum() if keep is not None else angles.sum())
                sums[unit][1] += int(keep.sum()) if keep is not None else cos.numel()

            hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    full_logp = []
    current: dict[str, torch.Tensor] = {}  # token masks of the batch in flight
    try:
        for inputs, mask in batches:
            src_mask = inputs.get("attention_mask")
            current.update(src=src_mask.bool() if src_mask is not None else None, tgt=mask.bool())
            full_logp.append(F.log_softmax(model(**inputs).logits.float(), dim=-1))
    finally:
        for h in hooks:
            h.remove()
    angle = {u: v[0] / max(v[1], 1) for u, v in sums.items()}
    kl = {u: _kl(family, batches, full_logp, [u]) for u in units}  # one pruned pass per unit and batch
    return {"kl": kl, "angle": angle}


@torch.inference_mode()
def kl_to_full(family: ModelFamily, batches: list[tuple[dict, torch.Tensor]], removed: list[str]) -> float:
    """KL(full || model without ``removed``) in nats per target token over ``batches``.

    The first-stage proxy of a search (``search.fidelity.proxy: kl``): one teacher-forced pass of
    the full and one of the pruned model per batch, no decoding.
    """
    total, count = 0.0, 0
    for batch in batches:  # one batch at a time: full distributions over a big vocabulary are large
        lp_full = F.log_softmax(family.model(**batch[0]).logits.float(), dim=-1)
        kl = _kl(family, [batch], [lp_full], removed)
        n = int(batch[1].sum())
        total, count = total + kl * n, count + n
    return total / max(count, 1)


# The full model's distribution kept per target token: all of it up to KL_EXACT_VOCAB tokens (exact KL),
# else its top KL_TOPK log-probs + one bucket for the rest (256k-token NLLB: 1 MiB per token otherwise).
KL_TOPK = 256
KL_EXACT_VOCAB = 32768


@torch.inference_mode()
def full_targets(family: ModelFamily, batch: tuple[dict, torch.Tensor], k: int | None = -1):
    """What KL needs of the full model for one teacher-forced batch, at target positions only:
    ``(log-probs, None)`` when ``k`` is None or covers the vocabulary, else ``(top-k log-probs, their ids)``;
    by default exact up to ``KL_EXACT_VOCAB`` tokens, top ``KL_TOPK`` beyond.
    Computed once per batch and cached by the actor (:meth:`EvaluatorActor.kl`); the full model never changes."""
    inputs, mask = batch
    lp = F.log_softmax(family.model(**inputs).logits.float(), dim=-1)[mask]
    if k == -1:  # the default policy
        k = None if lp.shape[-1] <= KL_EXACT_VOCAB else KL_TOPK
    if k is None or k >= lp.shape[-1]:
        return lp, None
    val, idx = lp.topk(k, dim=-1)
    return val, idx


@torch.inference_mode()
def kl_cached(family: ModelFamily, batches: list[tuple[dict, torch.Tensor]], targets: list, removed: list[str]) -> float:
    """KL(full || model without ``removed``) in nats per target token, from cached :func:`full_targets`:
    one teacher-forced pass of the pruned model per batch. With top-k targets the full distribution is
    its k most likely tokens plus one bucket for the rest (the KL of that coarser distribution: a lower
    bound, equal to the exact KL when the tail mass is the same under both models)."""
    total, count = 0.0, 0
    with family.apply(removed):
        for (inputs, mask), (val, idx) in zip(batches, targets):
            lq = F.log_softmax(family.model(**inputs).logits.float(), dim=-1)[mask]
            total += float(_kl_rows(val, idx, lq).sum())
            count += int(mask.sum())
    return total / max(count, 1)


def _kl_rows(val: torch.Tensor, idx: torch.Tensor | None, lq: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return (val.exp() * (val - lq)).sum(-1)
    p, lq_head = val.exp(), lq.gather(-1, idx)
    head = (p * (val - lq_head)).sum(-1)
    rest_p = (1.0 - p.sum(-1)).clamp_min(1e-12)
    rest_q = (1.0 - lq_head.exp().sum(-1)).clamp_min(1e-12)
    return head + rest_p * (rest_p.log() - rest_q.log())


def _kl(family: ModelFamily, batches, full_logp: list[torch.Tensor], removed: list[str]) -> float:
    total, count = 0.0, 0
    with family.apply(removed):
        for (inputs, mask), lp_full in zip(batches, full_logp):
            lp = F.log_softmax(family.model(**inputs).logits.float(), dim=-1)
            per_tok = (lp_full.exp() * (lp_full - lp)).sum(-1)
            total += float(per_tok[mask].sum())
            count += int(mask.sum())
    return total / max(count, 1)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))
