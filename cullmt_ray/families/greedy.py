"""Greedy decoding without ``generate``: the same tokens as HF greedy search, less work per batch.

``generate(num_beams=1, do_sample=False)`` keeps computing every row of a batch until its longest
row ends (finished rows are fed padding) and pays its per-step bookkeeping (logits processors,
stopping criteria, input preparation). The loops here make the same model calls generate makes
(same cache classes, masks, position ids, forced tokens), take the argmax, and drop a row from the
batch (its KV cache rows, encoder states and masks) as soon as it emits EOS, so that a batch only
pays for the rows still running. Each row has its own limit of new tokens (generate has one per
batch), so a row's tokens do not depend on the batch it is decoded in: the families pass each
sentence the limit generate would give it in the plain batches and form their batches freely.

They handle the generation-config settings greedy decoding of the supported models uses (EOS ids,
decoder start, forced BOS/EOS); :func:`unsupported` names any other setting that would change
greedy's tokens (a repetition penalty, n-gram blocking, suppressed tokens, a minimum length, ...),
and the families then fall back to ``generate``.

:func:`greedy_encdec_group` decodes several prune sets of one encoder-decoder at once (a race round's candidates):
one batch holds every set's rows and each decoder layer computes the rows of the sets that keep it, so small
chunks decode in full batches; a row's tokens are still those of its set decoded alone.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from .head import head_argmax

# generation-config fields that add a logits processor or stopping criterion greedy decoding would apply and
# these loops do not implement, with their neutral values (transformers 5 leaves unset fields None): any
# other value falls back to generate
_NEUTRAL = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None, []),
            "sequence_bias": (None, {}), "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []),
            "min_length": (None, 0), "min_new_tokens": (None, 0), "exponential_decay_length_penalty": (None,),
            "guidance_scale": (None, 1.0), "watermarking_config": (None,), "stop_strings": (None, []),
            "max_time": (None,), "remove_invalid_values": (None, False), "renormalize_logits": (None, False),
            "cache_implementation": (None, "dynamic"), "prefill_chunk_size": (None,), "is_assistant": (None, False),
            "num_beams": (None, 1), "do_sample": (None, False), "num_return_sequences": (None, 1),
            "use_cache": (None, True)}


def generation_config(model, **overrides) -> GenerationConfig:
    """The model's generation config with ``overrides`` applied, as ``generate`` would see it."""
    gc = copy.deepcopy(model.generation_config)
    gc.update(**overrides)
    return gc


def unsupported(gc: GenerationConfig) -> str | None:
    """The first setting of ``gc`` the greedy loops cannot reproduce (greedy search with a cache, EOS ids,
    decoder start, forced BOS/EOS), or None."""
    for f, neutral in _NEUTRAL.items():
        if getattr(gc, f, None) not in neutral:
            return f
    if gc.eos_token_id is None:
        return "eos_token_id"
    return None


def _eos(gc: GenerationConfig, device) -> torch.Tensor:
    ids = gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id]
    return torch.tensor(list(ids), dtype=torch.long, device=device)


def _pick(logits: torch.Tensor, eos: torch.Tensor, forced_eos: int | None, at_limit: torch.Tensor | None) -> torch.Tensor:
    """The next token of each row: the argmax, or the forced EOS on a row's last allowed step (generate's
    ForcedEOSTokenLogitsProcessor at ``max_length - 1``)."""
    # argmax's (the first largest), in about 60% of its time on CPU
    return _forced(logits.float().max(-1).indices, forced_eos, at_limit)


def _pick_head(head, hidden: torch.Tensor, forced_eos: int | None, at_limit: torch.Tensor | None) -> torch.Tensor:
    """:func:`_pick` of ``head(hidden)``, the head's product certified in bfloat16 where it can be
    (:func:`cullmt_ray.families.head.head_argmax`: the same tokens)."""
    return _forced(head_argmax(head, hidden), forced_eos, at_limit)


def _forced(nxt: torch.Tensor, forced_eos: int | None, at_limit: torch.Tensor | None) -> torch.Tensor:
    """``nxt``, with the forced EOS on the rows at their last allowed step."""
    if forced_eos is not None and at_limit is not None:
        nxt = torch.where(at_limit, torch.full_like(nxt, forced_eos), nxt)
    return nxt


def _first(ids):
    return ids[0] if isinstance(ids, (list, tuple)) else ids


class _Rows:
    """Generated tokens per row of the original batch; which rows the batch still holds and which of them still
    run. Row ``i`` may generate ``limits[i]`` tokens (generate's ``max_new_tokens``; a row's own limit, so that a
    row's tokens never depend on the other rows of its batch).

    A finished row stays in the batch (computed, its tokens ignored) until finished rows make up ``1/slack`` of
    it: dropping rows copies every cache tensor, which costs more than a few idle rows for a step or two.
    """

    slack: int = 8

    def __init__(self, limits: list[int], device, slack: int | None = None):
        if slack is not None:
            self.slack = slack
        self.tokens: list[list[int]] = [[] for _ in limits]
        self.live = list(range(len(limits)))  # the original row of each batch row
        self.running = torch.ones(len(limits), dtype=torch.bool, device=device)
        self.limits = torch.tensor(limits, dtype=torch.long, device=device)
        self.steps = max(limits) if limits else 0

    def at_limit(self, step: int) -> torch.Tensor | None:
        """Which batch rows generate their last allowed token at ``step`` (None: none)."""
        hit = self.limits == step + 1
        return hit if bool(hit.any()) else None

    def add(self, nxt: torch.Tensor, eos: torch.Tensor, step: int) -> torch.Tensor | None:
        """Record ``nxt`` (one token per batch row) for the running rows; the positions of the rows the batch
        keeps, or None if it keeps all (an empty tensor: every row is done)."""
        done = (torch.isin(nxt, eos) | (self.limits <= step + 1)) & self.running
        for r, t, run in zip(self.live, nxt.tolist(), self.running.tolist()):
            if run:
                self.tokens[r].append(t)
        if not bool(done.any()):
            return None
        self.running &= ~done
        running = int(self.running.sum())
        if running and (len(self.live) - running) * self.slack < len(self.live):
            return None
        keep = self.running.nonzero().squeeze(1)
        self.live = [self.live[i] for i in keep.tolist()]
        self.limits, self.running = self.limits[keep], self.running[keep]
        return keep

    def advance(self, nxt: torch.Tensor, eos: torch.Tensor, step: int, cache, *rows_of: torch.Tensor | None):
        """:meth:`add`, then the rows the batch drops leave ``cache`` and each of ``rows_of`` (per-row tensors;
        None stays None): the narrowed tensors, or None when every row is done."""
        keep = self.add(nxt, eos, step)
        if keep is None:
            return rows_of
        if not self.live:
            return None
        cache.batch_select_indices(keep)
        return tuple(t.index_select(0, keep) if t is not None else None for t in rows_of)


class _GrowingLayer(DynamicLayer):
    """A self-attention KV cache layer that writes each step's keys and values into spare room at the end of a
    buffer (doubled when full) instead of concatenating: ``DynamicLayer`` copies the whole cache every step
    (``torch.cat``), which costs as much as the attention itself on long prompts. ``keys``/``values`` are views
    of the filled part: the same numbers, so the same tokens. ``room``: the positions the loop will fill (its
    prompt and new tokens), the first buffer's size when it holds them (no doubling, no copy when full)."""

    def __init__(self, room: int | None = None):
        super().__init__()
        self.room = room

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._len = 0
        new = key_states.shape[-2]
        if self._k is None or self._len + new > self._k.shape[-2]:
            self._regrow(key_states, value_states, key_states.shape[0], self._room(self._len + new))
        self._k[..., self._len : self._len + new, :] = key_states
        self._v[..., self._len : self._len + new, :] = value_states
        self._len += new
        self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]
        return self.keys, self.values

    def _room(self, need: int) -> int:
        return self.room if self.room is not None and self.room >= need else max(2 * need, 16)

    def _regrow(self, like_k: torch.Tensor, like_v: torch.Tensor, rows: int, room: int) -> None:
        """New buffers of ``rows`` rows with ``room`` positions, holding what the old ones held."""
        k, v = (t.new_empty((rows, *t.shape[1:-2], room, t.shape[-1])) for t in (like_k, like_v))
        if self._len:
            k[..., : self._len, :] = self._k[..., : self._len, :]
            v[..., : self._len, :] = self._v[..., : self._len, :]
        self._k, self._v = k, v

    def fill(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Start the empty layer with the rows of several caches' keys/values, in order (``update`` with their
        concatenation, without the concatenated copy)."""
        self.lazy_initialization(keys[0], values[0])
        self._k = self._v = None
        self._len = 0
        n = keys[0].shape[-2]
        self._regrow(keys[0], values[0], sum(k.shape[0] for k in keys), self._room(n))
        at = 0
        for part_k, part_v in zip(keys, values):
            self._k[at : at + part_k.shape[0], ..., :n, :] = part_k
            self._v[at : at + part_v.shape[0], ..., :n, :] = part_v
            at += part_k.shape[0]
        self._len = n
        self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices``: their filled part copied into a buffer of the same room (indexing
        ``[indices]`` copied the unfilled room too)."""
        if self.get_seq_length() > 0:
            self._k, self._v = (_select_rows(t, indices, self._len) for t in (self._k, self._v))
            self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]


class _SelectingLayer(DynamicLayer):
    """A ``DynamicLayer`` (the cross-attention cache) that keeps batch rows with ``index_select`` (see
    :meth:`_GrowingLayer.batch_select_indices`): the same numbers."""

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values = self.keys.index_select(0, indices), self.values.index_select(0, indices)


def _select_rows(buffer: torch.Tensor, indices: torch.Tensor, filled: int) -> torch.Tensor:
    """Rows ``indices`` of a KV buffer ``(rows, heads, room, dim)`` whose first ``filled`` positions hold numbers,
    in a new buffer of the same room."""
    out = buffer.new_empty((indices.numel(), *buffer.shape[1:]))
    torch.index_select(buffer[..., :filled, :], 0, indices, out=out[..., :filled, :])
    return out


def _self_attention_cache(config, room: int | None = None) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain (full-attention) layers grow in place (:class:`_GrowingLayer`,
    ``room`` positions); other layer kinds (sliding windows, ...) stay as transformers makes them."""
    return _cache_of(config, lambda: _GrowingLayer(room))


def _cross_attention_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config``'s cross-attention, its plain layers :class:`_SelectingLayer`."""
    return _cache_of(config, _SelectingLayer)


def _cache_of(config, new_layer) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = [new_layer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# Encoder-decoder classes whose forward is ``lm_head(decoder(...)[0])``: the loop calls the decoder and the head
# itself (skipping the wrappers, and the head where the token is forced); any other class runs its full forward.
_DIRECT = ("M2M100ForConditionalGeneration", "NllbMoeForConditionalGeneration")


@torch.inference_mode()
def greedy_encdec(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, gc: GenerationConfig,
                  limits: list[int], encoder_outputs=None, forced_bos: torch.Tensor | None = None) -> list[list[int]]:
    """Greedy tokens of an encoder-decoder model for a padded batch: ``generate``'s with
    ``max_new_tokens=limits[i]`` for row ``i``, without the decoder start token and without padding after
    EOS. ``encoder_outputs``: the encoder's output when known. ``forced_bos``: each row's forced first token
    (rows of several target languages in one batch), instead of ``gc.forced_bos_token_id``."""
    from transformers.masking_utils import create_bidirectional_mask

    device = input_ids.device
    if encoder_outputs is None:
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    hidden = encoder_outputs.last_hidden_state
    start = _first(gc.decoder_start_token_id if gc.decoder_start_token_id is not None else gc.bos_token_id)
    eos, forced_eos = _eos(gc, device), gc.forced_eos_token_id
    forced_eos = _first(forced_eos) if forced_eos is not None else None
    conf = model.config.get_text_config(decoder=True)
    rows = _Rows(limits, device)
    cache = EncoderDecoderCache(_self_attention_cache(conf, rows.steps + 1), _cross_attention_cache(conf))
    cur = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=device)
    direct = type(model).__name__ in _DIRECT
    if direct:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        # the decoder's cross-attention mask, built once as it builds it every step (None: no padding)
        mask = create_bidirectional_mask(config=decoder.config, inputs_embeds=hidden[:, :1],
                                         attention_mask=attention_mask, encoder_hidden_states=hidden)
    else:
        mask, out_cls = attention_mask, type(encoder_outputs)
    for step in range(rows.steps):
        at_limit = rows.at_limit(step) if forced_eos is not None else None
        forced = step == 0 and (forced_bos is not None or gc.forced_bos_token_id is not None)
        if direct:
            state = decoder(input_ids=cur, encoder_hidden_states=hidden, encoder_attention_mask=mask, cache=cache,
                            use_cache=True, return_dict=True).last_hidden_state
            # a forced first token needs no head
            top = None if forced else head_argmax(head, state[:, -1])
            del state
        else:
            out = model(encoder_outputs=out_cls(last_hidden_state=hidden), attention_mask=mask,
                        decoder_input_ids=cur, cache=cache, use_cache=True, return_dict=True)
            top, cache = out.logits[:, -1].float().max(-1).indices, out.cache
            del out
        if forced:
            nxt = forced_bos.to(device=device, dtype=torch.long) if forced_bos is not None else \
                torch.full((cur.shape[0],), gc.forced_bos_token_id, dtype=torch.long, device=device)
            nxt = _forced(nxt, forced_eos, at_limit)
        else:
            nxt = _forced(top, forced_eos, at_limit)
        kept = rows.advance(nxt, eos, step, cache, hidden, nxt, mask)
        if kept is None:
            break
        hidden, nxt, mask = kept
        cur = nxt[:, None]
    return rows.tokens


class _Subsets:
    """Which rows of a lockstep batch each decoder layer computes: the rows of the candidates that keep it, as
    positions in the batch (None: every row). A layer's KV cache holds its rows in batch order."""

    def __init__(self, keeps: list[list[bool]], rows: int, device):
        self.member = [torch.tensor([k for k in keep for _ in range(rows)], dtype=torch.bool, device=device)
                       for keep in zip(*keeps)]  # per layer: does row r's candidate keep it
        self.index = [self._index(m) for m in self.member]

    @staticmethod
    def _index(member: torch.Tensor) -> torch.Tensor | None:
        return None if bool(member.all()) else member.nonzero().squeeze(1)

    def first(self) -> int:
        """The first layer that holds rows: the masks are sized against its KV cache (a layer whose rows have all
        left holds none, and reads as empty)."""
        return next(i for i, m in enumerate(self.member) if bool(m.any()))

    def select(self, keep: torch.Tensor) -> list[torch.Tensor]:
        """Keep batch rows ``keep``; per layer, the positions in its KV cache of the rows it keeps."""
        picks = []
        for i, m in enumerate(self.member):
            kept = m[keep]
            picks.append((m.long().cumsum(0) - 1)[keep][kept])
            self.member[i], self.index[i] = kept, self._index(kept)
        return picks


@torch.inference_mode()
def greedy_encdec_group(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, gc: GenerationConfig,
                        limits: list[int], encoder_states: list[torch.Tensor], keeps: list[list[bool]],
                        forced_bos: torch.Tensor) -> list[list[list[int]]]:
    """:func:`greedy_encdec` for several prune sets at once, in lockstep: one batch holds every prune set's rows
    (prune set ``c``'s rows ``c * B .. c * B + B - 1`` for a batch of ``B`` sentences), and each decoder layer
    computes the rows of the prune sets that keep it (``keeps[c][layer]``), reading and writing their hidden states
    and its own KV cache of them. The model is the full one (no prune set applied); ``encoder_states[c]`` is prune
    set ``c``'s encoder output for the batch. A row's numbers are those of decoding its prune set alone (a row
    does not depend on the rows it is computed with, as everywhere in this module), in batches ``len(keeps)`` times
    as full: the per-step cost that a small batch pays for each layer (reading its weights, the call) is paid
    once for all. Returns, per prune set, the tokens of each sentence."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    device = input_ids.device
    n_sets, b = len(keeps), input_ids.shape[0]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    layers = list(decoder.layers)
    start = _first(gc.decoder_start_token_id if gc.decoder_start_token_id is not None else gc.bos_token_id)
    eos, forced_eos = _eos(gc, device), gc.forced_eos_token_id
    forced_eos = _first(forced_eos) if forced_eos is not None else None
    conf = model.config.get_text_config(decoder=True)
    # rows leave at a quarter finished, not an eighth: a drop copies every layer's caches of every set's rows
    rows = _Rows(list(limits) * n_sets, device, slack=4)
    cache = EncoderDecoderCache(_self_attention_cache(conf, rows.steps + 1), _cross_attention_cache(conf))
    subsets = _Subsets(keeps, b, device)
    states = torch.cat(encoder_states)
    cross = create_bidirectional_mask(config=decoder.config, inputs_embeds=states[:, :1],
                                      attention_mask=attention_mask.repeat(n_sets, 1), encoder_hidden_states=states)
    cross_of = [cross if cross is None or idx is None else cross[idx] for idx in subsets.index]
    forced_bos = forced_bos.to(device=device, dtype=torch.long).repeat(n_sets)
    cur = torch.full((rows.running.shape[0], 1), start, dtype=torch.long, device=device)
    for step in range(rows.steps):
        at_limit = rows.at_limit(step) if forced_eos is not None else None
        n = cur.shape[0]
        # the decoder's forward, layer by layer over each layer's rows
        embeds = decoder.embed_tokens(cur)
        mask = create_causal_mask(config=decoder.config, inputs_embeds=embeds,
                                  attention_mask=torch.ones(n, step + 1, device=device),
                                  cache=cache.self_attention_cache, layer_idx=subsets.first())
        hidden = embeds + decoder.embed_positions(cur, embeds, step).to(device)
        for i, layer in enumerate(layers):
            idx = subsets.index[i]
            if idx is None:
                hidden = layer(hidden, mask, states if step == 0 else states[:0], encoder_attention_mask=cross_of[i],
                               cache=cache, use_cache=True)
            elif idx.numel():
                # cross keys/values are cached after step 0
                sub = layer(hidden.index_select(0, idx), mask if mask is None else mask[idx],
                            states.index_select(0, idx) if step == 0 else states[:0],
                            encoder_attention_mask=cross_of[i], cache=cache, use_cache=True)
                hidden = hidden.index_copy(0, idx, sub)
        if step == 0:
            nxt = _forced(forced_bos, forced_eos, at_limit)
        else:
            nxt = _pick_head(head, decoder.layer_norm(hidden)[:, -1], forced_eos, at_limit)
        del hidden
        keep = rows.add(nxt, eos, step)
        if keep is not None:
            if not rows.live:
                break
            for i, pick in enumerate(subsets.select(keep)):
                if cache.self_attention_cache.layers[i].is_initialized:  # a layer no prune set keeps has none
                    cache.self_attention_cache.layers[i].batch_select_indices(pick)
                    cache.cross_attention_cache.layers[i].batch_select_indices(pick)
            nxt = nxt[keep]
            if cross is not None:
                cross = cross[keep]
                cross_of = [cross if idx is None else cross[subsets.member[i]] for i, idx in enumerate(subsets.index)]
        cur = nxt[:, None]
    return [rows.tokens[c * b : (c + 1) * b] for c in range(n_sets)]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch: each row counts its own tokens (0 at padding), as ``generate`` does."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _stems(rows: list[list[int]], groups: list) -> tuple[list[int], list[int]]:
    """Per prompt (its tokens, no padding), its stem (the index of the first prompt of its group) and how many of its
    tokens that stem holds: the tokens every prompt of the group starts with, and never a prompt's last token (its
    logits pick the first new token)."""
    first: dict = {}
    stem = [first.setdefault(g, i) for i, g in enumerate(groups)]
    common: dict[int, int] = {}
    for i, s in enumerate(stem):
        a, b, n = rows[i], rows[s], common.get(s, len(rows[s]) - 1)
        k = 0
        while k < min(n, len(a) - 1) and a[k] == b[k]:
            k += 1
        common[s] = k
    return stem, [common[s] for s in stem]


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of token rows padded on the left (with id 0: padding is masked)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


# What one more stem run costs besides its tokens, in padded stem tokens: a forward call's per-layer overhead and its
# smaller matrix products (on reference:llama 64, 256 and 1024 timed alike; bench_speed.py part `stems`)
STEM_RUN_TOKENS = 64


def _stem_runs(lengths: list[int], run_tokens: int | None = None) -> list[list[int]]:
    """The stems (by index) cut into runs of similar length, each to be padded to its longest only: the split of the
    length-sorted stems with the fewest padded tokens plus ``run_tokens`` (default :data:`STEM_RUN_TOKENS`) per run
    (exact, O(n^2)); zero-length stems (nothing to run) are left out."""
    run_tokens = STEM_RUN_TOKENS if run_tokens is None else run_tokens
    order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: lengths[i])
    cost, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # the last run is order[i:j], padded to its longest, lengths[order[j - 1]]
            c = cost[i] + (j - i) * lengths[order[j - 1]] + run_tokens
            if c < cost[j]:
                cost[j], cut[j] = c, i
    runs, j = [], len(order)
    while j:
        runs.append(order[cut[j] : j])
        j = cut[j]
    return runs[::-1]


def _shared_prompts(model, input_ids, attention_mask, groups, cache, prefill, kw):
    """The prompt pass with the prompts of a group sharing their common first tokens (:func:`_stems`): the stems run
    once (with ``prefill(stem_cache, run)``), in runs of similar length (:func:`_stem_runs`: a run is padded to its
    own longest stem, not the batch's), each row's keys/values of its stem are copied into ``cache``, and the rows'
    own remaining tokens run after them (padding between the stem and them where the rows' rests differ in length).
    Every token keeps its position and attends to the same tokens as in the plain prompt pass, so a row's tokens are
    its tokens there (padding never changes them: rows are exact): (last logits, the attention mask of the cached
    tokens, the next positions)."""
    device = input_ids.device
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
    stem, held = _stems(rows, groups)
    order = list(dict.fromkeys(stem))
    slot = {s: k for k, s in enumerate(order)}
    stems = [rows[s][: held[s]] for s in order]
    _, stem_mask = _left_pad(stems, device)  # the cached stems' mask, each left-padded to the longest
    width = stem_mask.shape[1]
    conf = model.config.get_text_config(decoder=True)
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    kv: list[list[torch.Tensor]] = []  # per layer: keys and values of every stem, left-padded to ``width``
    for k, run in enumerate(_stem_runs([len(t) for t in stems])):
        ids, mask = _left_pad([stems[i] for i in run], device)
        run_cache = _self_attention_cache(conf)
        with prefill(run_cache, k) if prefill is not None else contextlib.nullcontext():
            inner(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), cache=run_cache, use_cache=True,
                  return_dict=True)
        at = torch.tensor(run, device=device)
        for i, layer in enumerate(run_cache.layers):
            if len(kv) <= i:
                shape = (len(stems), *layer.keys.shape[1:-2], width, layer.keys.shape[-1])
                kv.append([layer.keys.new_zeros(shape), layer.values.new_zeros(shape)])
            kv[i][0][at, ..., width - ids.shape[1]:, :] = layer.keys
            kv[i][1][at, ..., width - ids.shape[1]:, :] = layer.values
    which = torch.tensor([slot[s] for s in stem], device=device)
    for i, (keys, values) in enumerate(kv):
        cache.layers[i].update(keys.index_select(0, which), values.index_select(0, which))
    rest_ids, rest_mask = _left_pad([r[held[i]:] for i, r in enumerate(rows)], device)
    mask = torch.cat([stem_mask[which], rest_mask], dim=-1)
    pos = _positions(mask)[:, width:]
    out = model(input_ids=rest_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                return_dict=True, **kw)
    return out.logits[:, -1], mask, pos[:, -1:] + 1


def _prompt_pass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, prefill=None,
                 groups: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Greedy's first step on a left-padded batch of prompts, into the empty ``cache``: (each row's last logits,
    the attention mask of the cached tokens (None: all ones, which generate drops), the next positions).
    ``prefill``/``groups``: see :func:`greedy_causal`."""
    kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    if groups is not None and len(set(groups)) < len(groups) and \
            all(type(layer) is _GrowingLayer for layer in cache.layers):  # sliding windows etc.: the plain pass
        return _shared_prompts(model, input_ids, attention_mask, groups, cache, prefill, kw)
    pos = _positions(attention_mask)
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    with prefill(cache) if prefill is not None else contextlib.nullcontext():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    return_dict=True, **kw)
    return out.logits[:, -1], mask, pos[:, -1:] + 1


@torch.inference_mode()
def greedy_causal(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, gc: GenerationConfig,
                  limits: list[int], prefill=None, groups: list | None = None) -> list[list[int]]:
    """Greedy continuation tokens of a decoder-only model for a left-padded batch of prompts: ``generate``'s
    new tokens with ``max_new_tokens=limits[i]`` for row ``i``, without padding after EOS. ``prefill(cache)``:
    a context for the prompt pass (e.g. :func:`cullmt_ray.families.prefix.shared_prefill`). ``groups``: a key per
    row; the prompts of rows with the same key (one source translated into several languages) share their first
    tokens, which the prompt pass then computes once (:func:`_shared_prompts`)."""
    device = input_ids.device
    eos, forced_eos = _eos(gc, device), gc.forced_eos_token_id
    forced_eos = _first(forced_eos) if forced_eos is not None else None
    rows = _Rows(limits, device)
    cache = _self_attention_cache(model.config.get_text_config(decoder=True), input_ids.shape[1] + rows.steps)
    kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # a LOCKSTEP_CAUSAL model's forward is its head on its decoder's output: the loop calls the two (head_argmax)
    inner = model.get_decoder() if type(model).__name__ in LOCKSTEP_CAUSAL else None
    head = model.get_output_embeddings()
    cur = pos = mask = None  # the step's input tokens and positions, the cached tokens' mask: from the prompt pass on
    for step in range(rows.steps):
        at_limit = rows.at_limit(step) if forced_eos is not None else None
        if step == 0:
            logits, mask, last = _prompt_pass(model, input_ids, attention_mask, cache, prefill, groups)
            nxt = _pick(logits, eos, forced_eos, at_limit)
        elif inner is not None:
            out = inner(input_ids=cur, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                        return_dict=True)
            nxt, last = _pick_head(head, out.last_hidden_state[:, -1], forced_eos, at_limit), pos[:, -1:] + 1
            del out
        else:
            out = model(input_ids=cur, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                        return_dict=True, **kw)
            logits, cache, last = out.logits[:, -1], out.cache, pos[:, -1:] + 1
            del out
            nxt = _pick(logits, eos, forced_eos, at_limit)
        kept = rows.advance(nxt, eos, step, cache, nxt, last, mask)
        if kept is None:
            break
        nxt, last, mask = kept
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        cur, pos = nxt[:, None], last
    return rows.tokens


# Decoder-only classes whose forward is ``lm_head(norm(layers(embed(ids))))`` with rotary position embeddings
# computed once for every layer: the lockstep loop (greedy_causal_group) calls those parts itself.
LOCKSTEP_CAUSAL = ("LlamaForCausalLM",)


@torch.inference_mode()
def greedy_causal_group(model, prompts: list[tuple], keeps: list[list[bool]], gc: GenerationConfig,
                        limits: list[int]) -> list[list[list[int]]]:
    """:func:`greedy_causal` for several prune sets at once, in lockstep (a :data:`LOCKSTEP_CAUSAL` model; see
    :func:`greedy_encdec_group`): ``prompts[c]`` is prune set ``c``'s prompt pass of the same batch of ``B``
    prompts, ``(cache, logits, mask, next positions)`` (:func:`_prompt_pass` with the set applied: its cache holds
    the layers it keeps, in order; the list is emptied once their keys/values are copied, so that their caches are
    freed), ``keeps[c][layer]`` whether it keeps a layer of the full model (none applied now). One batch holds every
    set's rows (set ``c``'s rows ``c * B .. c * B + B - 1``) and each layer computes the
    rows of the sets that keep it; a row's numbers are those of decoding its set alone. Returns, per prune set, the
    tokens of each row."""
    from transformers.masking_utils import create_causal_mask

    inner, head = model.get_decoder(), model.get_output_embeddings()
    layers = list(inner.layers)
    n_sets, b = len(keeps), len(limits)
    logits = torch.cat([p[1] for p in prompts])
    device = logits.device
    eos, forced_eos = _eos(gc, device), gc.forced_eos_token_id
    forced_eos = _first(forced_eos) if forced_eos is not None else None
    rows = _Rows(list(limits) * n_sets, device, slack=4)  # see greedy_encdec_group
    room = max((layer.get_seq_length() for p in prompts for layer in p[0].layers[:1]), default=0) + rows.steps
    cache = _self_attention_cache(model.config.get_text_config(decoder=True), room)
    for i in range(len(layers)):  # layer i's keys/values: the rows of the sets that keep it, in set order
        kept = [p[0].layers[sum(keep[:i])] for p, keep in zip(prompts, keeps) if keep[i]]
        if kept:
            cache.layers[i].fill([k.keys for k in kept], [k.values for k in kept])
    mask, last = prompts[0][2], prompts[0][3].repeat(n_sets, 1)  # the same prompts: the same mask and positions
    mask = None if mask is None else mask.repeat(n_sets, 1)
    prompts.clear()
    subsets = _Subsets(keeps, b, device)
    cur = None
    for step in range(rows.steps):
        at_limit = rows.at_limit(step) if forced_eos is not None else None
        if step:  # the model's forward, layer by layer over each layer's rows
            embeds = inner.embed_tokens(cur)
            causal = create_causal_mask(config=inner.config, inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                        position_ids=last, layer_idx=subsets.first())
            cos, sin = inner.rotary_emb(embeds, position_ids=last)
            hidden = embeds
            for i, layer in enumerate(layers):
                idx = subsets.index[i]
                if idx is None:
                    hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=last,
                                   cache=cache, use_cache=True)
                elif idx.numel():
                    sub = layer(hidden.index_select(0, idx), attention_mask=causal if causal is None else causal[idx],
                                position_embeddings=(cos[idx], sin[idx]), position_ids=last[idx], cache=cache,
                                use_cache=True)
                    hidden = hidden.index_copy(0, idx, sub)
            nxt = _pick_head(head, inner.norm(hidden)[:, -1], forced_eos, at_limit)
            last = last + 1
            del hidden
        else:
            nxt = _pick(logits, eos, forced_eos, at_limit)
        keep = rows.add(nxt, eos, step)
        if keep is not None:
            if not rows.live:
                break
            for i, pick in enumerate(subsets.select(keep)):
                if cache.layers[i].is_initialized:  # a layer no prune set keeps has none
                    cache.layers[i].batch_select_indices(pick)
            nxt, last = nxt[keep], last[keep]
            mask = mask if mask is None else mask[keep]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        cur = nxt[:, None]
    return [rows.tokens[c * b : (c + 1) * b] for c in range(n_sets)]


def _accepts(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters
