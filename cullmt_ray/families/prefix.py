"""Prompt states at layer boundaries, shared by prune sets that keep the same first layers.

The candidates of a greedy or beam step each remove one more layer from the same base set, so two of
them run the same layers on a prompt up to the first layer one of them removes, and compute the same
hidden states and keys/values there. A decoder-only model's prompt pass (prefill) is half of a
candidate's decoding on the reference Llama. :class:`PrefixStates` keeps, per prompt batch, the hidden
state after each layer run and that layer's keys/values, keyed by the original indices of the layers run
so far; :func:`shared_prefill` starts a candidate's prefill after the longest prefix a candidate before
it ran on the same batch, writing the kept keys/values into its cache instead of computing them. These
are the numbers it would compute (the same layers on the same batch), so its tokens are the same.
Measured (``bench/bench_speed.py`` part ``states``): greedy's first step on reference:llama in 0.84-0.89x
of the time. The same replay of an encoder-decoder model's encoder bought 1%: not kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .base import TensorCache
from .greedy import _GrowingLayer


class PrefixStates(TensorCache):
    """``(batch key, kept layers so far) -> (hidden state after them, keys, values of the last of them)``,
    least recently used dropped beyond the limit (MiB)."""

    @staticmethod
    def batch_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
        """What a prompt pass depends on besides the layers: the padded prompt ids and mask."""
        h = hashlib.blake2b(digest_size=16)
        for t in (input_ids, attention_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def longest(self, batch: str, kept: tuple[int, ...]) -> list[tuple]:
        """The kept states of the longest prefix of ``kept`` run before on ``batch`` (every shorter one kept too),
        one per layer."""
        states = []
        while len(states) < len(kept) and (s := self.find((batch, kept[: len(states) + 1]))) is not None:
            states.append(s)
        return states


class _Replay(nn.Module):
    """Stands in for a layer whose prompt states are known: writes its keys/values into the cache and returns
    the hidden state after it."""

    def __init__(self, index: int, state: tuple) -> None:
        super().__init__()
        self.index, self.state = index, state

    def forward(self, hidden_states, *args, cache=None, **kwargs):
        hidden, key, value = self.state
        cache.update(key, value, self.index)
        return hidden


@contextmanager
def shared_prefill(owner: nn.Module, attr: str, states: PrefixStates, batch: str, kept: tuple[int, ...],
                   cache, part: int = 0) -> Iterator[int]:
    """Within the context, ``owner.<attr>`` (the kept layers, in order; ``kept`` their original indices) replays
    the longest prefix known for ``batch`` and runs the rest, whose states are kept afterwards. Yields how many
    layers are replayed. For one prompt pass of a batch (an empty ``cache``); ``part`` tells a batch's passes
    apart (its stems run in several passes, greedy._shared_prompts)."""
    layers = getattr(owner, attr)
    batch = f"{batch}#{part}" if part else batch
    if not all(type(layer) is _GrowingLayer for layer in cache.layers):  # sliding windows etc.: not replayed
        yield 0
        return
    known = states.longest(batch, kept)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [layers[i].register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
             for i in range(len(known), len(layers))]
    setattr(owner, attr, nn.ModuleList([_Replay(i, s) for i, s in enumerate(known)] + list(layers[len(known):])))
    try:
        yield len(known)
    finally:
        setattr(owner, attr, layers)
        for h in hooks:
            h.remove()
    for i in range(len(known), len(layers)):
        out = outputs.get(i)
        if not isinstance(out, torch.Tensor):
            return  # a layer kind that returns more than its hidden state: nothing kept
        layer = cache.layers[i]
        states.put((batch, kept[: i + 1]), (out, layer.keys.clone(), layer.values.clone()))
