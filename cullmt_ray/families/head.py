"""Greedy's next tokens from a float32 output head, computed in bfloat16 and certified (:func:`head_argmax`).

Greedy decoding needs only each row's argmax of ``head(hidden)``. The head's product is a decoder step's largest
for big vocabularies (NLLB-200's 256k tokens: about 60% of a decoder step's multiply-adds at 600M parameters) and,
on CPUs with native bfloat16 (AMX, AVX512-BF16), runs several times faster in bfloat16 (5x on the reference CPU;
on a GPU too, where bfloat16 products are summed in float32, which the bound needs). A row's bfloat16 argmax is
float32's whenever its lead is larger than the rounding can move the logits, which the numbers bound: with ``h``
and a weight row ``w`` rounded to bfloat16 (unit roundoff ``u = 2**-9``), their products exact in float32 and summed
in float32 over ``d`` terms (``g = d * 2**-24``, with room), and the sum rounded to bfloat16,

    |L_bf16 - L| <= (2u + u**2 + g) * sum_i |h_i w_i| + u * |L_bf16| / (1 - u)

of the exact logit ``L``, and float32's own logit is within ``g * sum_i |h_i w_i|`` of it; ``sum_i |h_i w_i|`` is at
most ``|h| * max |w|`` (Cauchy-Schwarz). The largest bfloat16 logit of a row is float32's argmax when it beats the
runner-up by more than twice those bounds (the bound grows with the logit, so the runner-up is the closest rival).
The other rows are computed again in float32 (about one in seven on the reference models; a row's float32 logits do
not depend on the rows computed with it, as everywhere in the greedy loop), as are the rows of a head this cannot
certify (a bias, another dtype, no native bfloat16) or whose product is too small to pay (``MIN_MACS``: a few rows
of a tiny model): the tokens are always float32 greedy's.
``CULLMT_BF16_HEAD=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
from torch import nn

U = 2.0 ** -9  # bfloat16's unit roundoff (round to nearest)
U32 = 2.0 ** -24  # float32's
SAFETY = 1.01  # room for the norms' own rounding (relative errors ~ d * 2**-24)
MIN_MACS = 1 << 23  # smaller products stay float32: there the bound's own steps cost more than the product saves

# id(weight) -> (its version and storage when converted, the weight in bfloat16, its largest row norm); an entry
# goes with its weight
_converted: dict[int, tuple] = {}


@functools.lru_cache(maxsize=None)
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (a bfloat16 product there is faster than a float32 one) and
    sums the products in float32 (on a GPU only where reduced-precision reductions are off, which the bound needs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported() and not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def certifiable(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether :func:`head_argmax` computes ``head``'s product in bfloat16 (else plainly, in float32)."""
    return (type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.float32
            and hidden.dtype == torch.float32 and hidden.numel() * head.out_features >= MIN_MACS
            and os.environ.get("CULLMT_BF16_HEAD", "1") != "0" and native_bf16(hidden.device))


def _bf16_weight(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``weight`` in bfloat16 and its largest row norm, converted once per weight (again if it changed)."""
    key = (weight._version, weight.data_ptr())
    got = _converted.get(id(weight))
    if got is None or got[0] != key:
        if got is None:
            weakref.finalize(weight, _converted.pop, id(weight), None)
        w = weight.detach()
        got = (key, w.to(torch.bfloat16), float(torch.linalg.vector_norm(w, dim=-1).max()))
        _converted[id(weight)] = got
    return got[1], got[2]


@torch.inference_mode()
def head_argmax(head: nn.Module, hidden: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """Each row's argmax of ``head(hidden)`` (the first largest, as ``head(hidden).float().max(-1).indices``),
    over the last axis. ``stats``: ``rows`` and ``recomputed`` (rows computed again in float32) are added to it."""
    if not certifiable(head, hidden):
        if stats is not None:
            stats["rows"] = stats.get("rows", 0) + hidden[..., 0].numel()
            stats["recomputed"] = stats.get("recomputed", 0) + hidden[..., 0].numel()
        return head(hidden).float().max(-1).indices
    h = hidden.reshape(-1, hidden.shape[-1])
    weight, wmax = _bf16_weight(head.weight)
    top = nn.functional.linear(h.to(torch.bfloat16), weight).topk(2, dim=-1)
    first, second = top.values.float().unbind(-1)
    g = h.shape[-1] * U32 * SAFETY
    slack = (2 * U + U * U + 2 * g) * torch.linalg.vector_norm(h, dim=-1) * wmax * SAFETY
    margin = U / (1 - U) * (first.abs() + second.abs()) + 2 * slack
    nxt = top.indices[:, 0].clone()
    redo = (~(first - second > margin)).nonzero().squeeze(1)  # NaN rows too
    if redo.numel():
        nxt[redo] = head(h[redo]).float().max(-1).indices
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + h.shape[0]
        stats["recomputed"] = stats.get("recomputed", 0) + redo.numel()
    return nxt.reshape(hidden.shape[:-1])
