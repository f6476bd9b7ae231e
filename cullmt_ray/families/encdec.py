"""Dense encoder-decoder translation models: NLLB-200, M2M-100, and anything exposing
``model.model.encoder.layers`` / ``model.model.decoder.layers``. Units: ``enc.i``, ``dec.i``."""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from torch import nn

from ..languages import SHORT_TO_NLLB
from ..config import Decoding
from .base import Example, FamilyError, LayerStack, ModelFamily, TensorCache
from .greedy import _DIRECT, generation_config, greedy_encdec, greedy_encdec_group, unsupported

_NLLB_TO_SHORT = {v: k for k, v in SHORT_TO_NLLB.items()}


class EncoderDecoderFamily(ModelFamily):
    name = "encdec"
    # Candidates that remove the same encoder units (none, or a greedy step's base set) share the encoder's
    # output: it is computed once per batch of sources and encoder units removed, and reused (bounded LRU;
    # None turns the cache off, e.g. for MoE gate statistics).
    encoder_cache_mib: ClassVar[float | None] = 256.0
    # Greedy decoding (num_beams 1) runs greedy.greedy_encdec: generate's tokens, finished rows dropped.
    fast_greedy: ClassVar[bool] = True
    # Race rounds decode their prune sets together (greedy.greedy_encdec_group): fuller batches for small chunks.
    lockstep: ClassVar[bool] = True

    def __init__(self, model: nn.Module, tokenizer, model_id: str):
        super().__init__(model, tokenizer, model_id)
        self.encoder_cache: TensorCache | None = None  # see keep_states
        # the lockstep loop calls the layers itself; CULLMT_LOCKSTEP=0 turns it off (one prune set after another)
        self.lockstep = self.lockstep and type(model).__name__ in _DIRECT and os.environ.get("CULLMT_LOCKSTEP", "1") != "0"

    def keep_states(self) -> None:
        """The encoder's output, reused by prune sets that remove the same encoder units (:meth:`_encoder_key`).
        (Replaying the states at encoder layer boundaries as the decoder-only family replays its prompt's bought 1%
        of a step: not kept.)"""
        if self.encoder_cache_mib:
            self.encoder_cache = TensorCache(self.encoder_cache_mib)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        return all(hasattr(getattr(inner, part, None), "layers") for part in ("encoder", "decoder")) \
            and not _is_moe(model)

    def _stacks(self) -> list[LayerStack]:
        inner = self.model.model
        return [LayerStack("enc", inner.encoder, "layers", ("encoder_layers",)),
                LayerStack("dec", inner.decoder, "layers", ("decoder_layers",))]

    def training_examples(self, src: str, tgt: str, sources: list[str], targets: list[str],
                          max_len: int) -> list[Example]:
        tok = self.tokenizer
        tok.src_lang, _ = self.lang_token(src)
        tok.tgt_lang, _ = self.lang_token(tgt)
        enc = tok(sources, text_target=targets)
        return [(a, b) for a, b in zip(enc["input_ids"], enc["labels"]) if len(a) <= max_len and len(b) <= max_len]

    def kd_hidden(self, out) -> torch.Tensor:
        """The encoder's output: what the decoder's cross-attention reads."""
        return out.encoder_last_hidden_state

    def kd_positions(self, prefix: str, batch: dict) -> torch.Tensor:
        """Source tokens for the encoder; for the decoder, the target positions (the labels)."""
        return batch["labels"] != -100 if prefix == "dec" else batch["attention_mask"].bool()

    def lang_token(self, code: str) -> tuple[str, int]:
        """The tokenizer's language key and the id generation must start with, for an NLLB code."""
        tok = self.tokenizer
        if hasattr(tok, "get_lang_id"):  # M2M-100: '__de__' tokens, 'de' keys
            short = _NLLB_TO_SHORT.get(code, code)
            try:
                return short, tok.get_lang_id(short)
            except KeyError:
                raise FamilyError(f"language {code!r} is not supported by {self.model_id}") from None
        tid = tok.convert_tokens_to_ids(code)
        if tid is None or tid == tok.unk_token_id:
            raise FamilyError(f"language {code!r} has no language token in {self.model_id}'s tokenizer")
        return code, tid

    def _generate(self, sources: list[str], src: str, tgt: str, decoding: Decoding) -> list[str]:
        src_key, _ = self.lang_token(src)
        _, tgt_id = self.lang_token(tgt)
        self.tokenizer.src_lang = src_key
        enc = self.tokenizer(sources, return_tensors="pt", padding=True).to(self.device)
        budget = min(decoding.max_new_tokens, int(enc["input_ids"].shape[1] * 2) + 10)
        extra = {}
        if self.encoder_cache is not None:
            hit = self.encoder_cache.get((self._encoder_key(), src_key, tuple(sources)), lambda: self._encode(enc))
            extra["encoder_outputs"] = type(hit)(last_hidden_state=hit.last_hidden_state)  # generate expands it for beams
        gen = self.model.generate(**enc, forced_bos_token_id=tgt_id, num_beams=decoding.num_beams,
                                  max_new_tokens=budget, do_sample=False, **extra)
        return self.tokenizer.batch_decode(gen, skip_special_tokens=True)

    def _tokenize_rows(self, rows: list[tuple[str, str, str]]) -> tuple[dict, tuple, list[int]]:
        """A batch of ``(source, src, tgt)`` rows, padded; each row's ``(source language key, text)``; each row's
        forced first token (its target language)."""
        tok = self.tokenizer
        ids: list[list[int]] = [[] for _ in rows]
        langs = {code: self.lang_token(code) for code in {c for _, src, tgt in rows for c in (src, tgt)}}
        keys = [langs[src][0] for _, src, _ in rows]
        for key in dict.fromkeys(keys):  # one tokenizer call per source language
            idx = [i for i, k in enumerate(keys) if k == key]
            tok.src_lang = key
            for i, row in zip(idx, tok([rows[i][0] for i in idx])["input_ids"]):
                ids[i] = row
        enc = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
        return enc, tuple(zip(keys, (r[0] for r in rows))), [langs[tgt][1] for _, _, tgt in rows]

    def _encoder_output(self, enc: dict, sources: tuple):
        """The encoder's output for a tokenized batch under the prune set applied now (from the cache when kept)."""
        if self.encoder_cache is None:
            return self._encode(enc, sources)
        return self.encoder_cache.get((self._encoder_key(), sources), lambda: self._encode(enc, sources))

    def _hypotheses(self, gc, tokens: list[list[int]]) -> list[str]:
        start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else gc.bos_token_id
        return self.tokenizer.batch_decode([[start, *r] for r in tokens], skip_special_tokens=True)

    def _greedy_rows(self, rows: list[tuple[str, str, str]], decoding: Decoding, limits: list[int]) -> list[str]:
        enc, sources, tgt_ids = self._tokenize_rows(rows)
        # without the cache (MoE gate statistics count every router call) the loop computes the encoder's output
        encoder_outputs = self._encoder_output(enc, sources) if self.encoder_cache is not None else None
        gc = self._greedy_config(tgt_ids[0], decoding)
        out = greedy_encdec(self.model, enc["input_ids"], enc["attention_mask"], gc, limits, encoder_outputs,
                            forced_bos=torch.tensor(tgt_ids, device=self.device))
        return self._hypotheses(gc, out)

    def _greedy_rows_group(self, rows: list[tuple[str, str, str]], decoding: Decoding, limits: list[int],
                           sets: list[frozenset[str]]) -> list[list[str]]:
        """Each prune set's encoder output (the cache shares it between sets with the same encoder units), then the
        decoder of every set in lockstep (:func:`greedy_encdec_group`)."""
        enc, sources, tgt_ids = self._tokenize_rows(rows)
        states = []
        for removed in sets:
            with self.apply(u for u in removed if u.startswith("enc.")):
                states.append(self._encoder_output(enc, sources).last_hidden_state)
        layers = len(self.model.get_decoder().layers)
        keeps = [[f"dec.{i}" not in removed for i in range(layers)] for removed in sets]
        gc = self._greedy_config(tgt_ids[0], decoding)
        out = greedy_encdec_group(self.model, enc["input_ids"], enc["attention_mask"], gc, limits, states, keeps,
                                  forced_bos=torch.tensor(tgt_ids, device=self.device))
        return [self._hypotheses(gc, tokens) for tokens in out]

    def _encoder_key(self) -> tuple[str, ...]:
        """What the encoder's output depends on besides its input: the encoder units removed. Candidates that remove
        only decoder units share the full encoder's output, and the candidates of a greedy or beam step that add a
        decoder unit to a base set share the base set's encoder."""
        return tuple(sorted(u for u in self.removed if u.startswith("enc.")))

    def _greedy_config(self, tgt_id: int, decoding: Decoding):
        """The generation config the greedy loop decodes with, or None where it does not apply (beams, a
        setting it does not implement, ``fast_greedy`` off): ``generate`` decodes then."""
        if not self.fast_greedy or decoding.num_beams != 1 or not self._greedy_here():
            return None
        gc = generation_config(self.model, forced_bos_token_id=tgt_id, num_beams=1, do_sample=False)
        return gc if unsupported(gc) is None else None

    def rows_exact(self, src: str, tgt: str, decoding: Decoding) -> bool:
        return self._greedy_config(self.lang_token(tgt)[1], decoding) is not None

    def _limit_lengths(self, sources: list[str], src: str, tgt: str) -> list[int]:
        self.tokenizer.src_lang, _ = self.lang_token(src)
        return [len(ids) for ids in self.tokenizer(sources)["input_ids"]]

    def _encode(self, enc: dict, sources: tuple | None = None):
        """The encoder's output for a tokenized batch (what ``generate`` would compute first). ``sources``: each row's
        ``(source language, text)``; rows with the same one (the directions out of one language of an N-way
        parallel dev set) are encoded once and their output copied: a row's output does not depend on the rows
        it is encoded with (the greedy loop relies on that too)."""
        encoder = self.model.get_encoder()
        slot: dict = {}  # source -> its row among the distinct ones
        which = [slot.setdefault(s, len(slot)) for s in sources] if sources is not None else []
        if sources is None or len(slot) == len(sources):
            return encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], return_dict=True)
        device = enc["input_ids"].device
        first: dict[int, int] = {}  # slot -> its first row (slots appear in order)
        for i, k in enumerate(which):
            first.setdefault(k, i)
        rows = torch.tensor(list(first.values()), device=device)
        out = encoder(input_ids=enc["input_ids"][rows], attention_mask=enc["attention_mask"][rows], return_dict=True)
        out.last_hidden_state = out.last_hidden_state[torch.tensor(which, device=device)]
        return out

    def teacher_forced(self, sources: list[str], targets: list[str], src: str, tgt: str) -> tuple[dict, torch.Tensor]:
        """Model inputs that score ``targets`` given ``sources``, and the mask of target positions."""
        tok = self.tokenizer
        tok.src_lang, _ = self.lang_token(src)
        tok.tgt_lang, _ = self.lang_token(tgt)
        enc = tok(sources, text_target=targets, padding=True, truncation=True, max_length=256, return_tensors="pt")
        labels = enc.pop("labels")
        start = self.model.config.decoder_start_token_id
        enc["decoder_input_ids"] = _shift_right(labels, tok.pad_token_id, start)
        return {k: v.to(self.device) for k, v in enc.items()}, (labels != tok.pad_token_id).to(self.device)


def _shift_right(labels: torch.Tensor, pad_id: int, start_id: int) -> torch.Tensor:
    out = labels.new_full(labels.shape, pad_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start_id
    return out


def _is_moe(model: nn.Module) -> bool:
    return "moe" in getattr(model.config, "model_type", "")
