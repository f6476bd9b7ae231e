"""Decoder-only LLMs (Llama, Qwen2, Mistral, ...: ``model.model.layers``). Units: ``layer.i``.

They translate from a prompt: a chat template for instruct models (when the tokenizer has
one), else a plain template. The output is the first line of the continuation.
"""

from __future__ import annotations

import functools
import os
from typing import ClassVar

import torch
from torch import nn

from ..languages import name as lang_name
from ..config import Decoding
from .base import Example, LayerStack, ModelFamily
from .greedy import (
    LOCKSTEP_CAUSAL,
    _prompt_pass,
    _self_attention_cache,
    generation_config,
    greedy_causal,
    greedy_causal_group,
    unsupported,
)
from .prefix import PrefixStates, shared_prefill

# The reference Llama is trained with this template; base LLMs follow it well enough too.
DEFAULT_TEMPLATE = "{src_name}: {source}\n{tgt_name}:"
CHAT_INSTRUCTION = "Translate the following {src_name} text into {tgt_name}. Reply with the translation only.\n\n{source}"


class DecoderOnlyFamily(ModelFamily):
    name = "decoder"
    causal = True
    # Greedy decoding (num_beams 1) runs greedy.greedy_causal: generate's tokens, finished rows dropped.
    fast_greedy: ClassVar[bool] = True
    # Prompt states at layer boundaries kept per replica (keep_states, prefix.py), MiB; None: not kept.
    prefix_states_mib: ClassVar[float | None] = 512.0
    # Race rounds decode their prune sets together (greedy.greedy_causal_group) where the model's class allows.
    lockstep: ClassVar[bool] = True

    def __init__(self, model: nn.Module, tokenizer, model_id: str, prompt_template: str | None = None,
                 use_chat_template: bool | None = None):
        super().__init__(model, tokenizer, model_id)
        self._layer_count = len(self.stacks[0].layers)
        self.prefix_states: PrefixStates | None = None  # see keep_states
        self.prompt_template = prompt_template or DEFAULT_TEMPLATE
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_chat if use_chat_template is None else use_chat_template
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the lockstep loop calls the layers itself; CULLMT_LOCKSTEP=0 turns it off (one prune set after another)
        self.lockstep = self.lockstep and type(model).__name__ in LOCKSTEP_CAUSAL and \
            os.environ.get("CULLMT_LOCKSTEP", "1") != "0"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        return hasattr(inner, "layers") and not hasattr(inner, "decoder") and not hasattr(inner, "encoder")

    def keep_states(self) -> None:
        """Prompt states at layer boundaries, replayed by prune sets that keep the same first layers."""
        if self.prefix_states_mib:
            self.prefix_states = PrefixStates(self.prefix_states_mib)

    def _stacks(self) -> list[LayerStack]:
        return [LayerStack("layer", self.model.model, "layers", ("num_hidden_layers",),
                           ("layer_types",) if hasattr(self.model.config, "layer_types") else ())]

    def training_examples(self, src: str, tgt: str, sources: list[str], targets: list[str],
                          max_len: int) -> list[Example]:
        """The prompt (no loss) followed by the target and EOS (loss)."""
        tok, out = self.tokenizer, []
        for source, target in zip(sources, targets):
            head = tok(self.prompt(source, src, tgt), add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None and not self.use_chat_template:
                head = [tok.bos_token_id] + head
            tail = tok(" " + target, add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                tail = tail + [tok.eos_token_id]
            if len(head) + len(tail) <= max_len:
                out.append((head + tail, [-100] * len(head) + tail))
        return out

    def kd_hidden(self, out) -> torch.Tensor:
        """The last layer's output."""
        return out.hidden_states[-1]

    def prompt(self, source: str, src: str, tgt: str) -> str:
        fields = {"src_name": lang_name(src), "tgt_name": lang_name(tgt), "source": source,
                  "src": src, "tgt": tgt}
        if self.use_chat_template:
            msg = [{"role": "user", "content": CHAT_INSTRUCTION.format(**fields)}]
            return self.tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        return self.prompt_template.format(**fields)

    def _prompt_ids(self, rows: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask of ``(source, src, tgt)`` rows."""
        tok = self.tokenizer
        ids = tok([self.prompt(s, src, tgt) for s, src, tgt in rows], add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and not self.use_chat_template:
            ids = [[tok.bos_token_id] + r for r in ids]
        enc = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _first_lines(self, new) -> list[str]:
        return [t.strip().split("\n")[0].strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _generate(self, sources: list[str], src: str, tgt: str, decoding: Decoding) -> list[str]:
        tok = self.tokenizer
        ids, mask = self._prompt_ids([(s, src, tgt) for s in sources])
        budget = min(decoding.max_new_tokens, 2 * max(self._limit_lengths(sources, src, tgt)) + 10)
        new = self.model.generate(input_ids=ids, attention_mask=mask, num_beams=decoding.num_beams,
                                  max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=_stop_ids(tok))[:, ids.shape[1] :]
        return self._first_lines(new)

    def _greedy_rows(self, rows: list[tuple[str, str, str]], decoding: Decoding, limits: list[int]) -> list[str]:
        ids, mask = self._prompt_ids(rows)
        groups = _groups(rows)
        return self._first_lines(greedy_causal(self.model, ids, mask, self._greedy_config(decoding), limits,
                                               self._prefill(self._batch_key(ids, mask, groups)), groups))

    def _greedy_rows_group(self, rows: list[tuple[str, str, str]], decoding: Decoding, limits: list[int],
                           sets: list[frozenset[str]]) -> list[list[str]]:
        """Each prune set's prompt pass (sharing stems and prompt states as alone), then every set's new tokens in
        lockstep (:func:`greedy_causal_group`)."""
        ids, mask = self._prompt_ids(rows)
        groups = _groups(rows)
        conf = self.model.config.get_text_config(decoder=True)
        batch, prompts = self._batch_key(ids, mask, groups), []
        for removed in sets:
            with self.apply(removed):
                cache = _self_attention_cache(conf)  # the layers the set keeps
                prompts.append((cache, *_prompt_pass(self.model, ids, mask, cache, self._prefill(batch), groups)))
        keeps = [[f"layer.{i}" not in removed for i in range(self._layer_count)] for removed in sets]
        out = greedy_causal_group(self.model, prompts, keeps, self._greedy_config(decoding), limits)
        return [self._first_lines(tokens) for tokens in out]

    def _batch_key(self, ids: torch.Tensor, mask: torch.Tensor, groups: list) -> str | None:
        """What a batch's kept prompt states are filed under (None where states are not kept)."""
        return None if self.prefix_states is None else PrefixStates.batch_key(ids, mask) + f"|{len(set(groups))}"

    def _prefill(self, batch: str | None):
        """The prompt pass's replay of ``batch``'s kept prompt states (:func:`shared_prefill`) for the prune set
        applied, or None where states are not kept."""
        if batch is None:
            return None
        kept = tuple(i for i in range(self._layer_count) if f"layer.{i}" not in self.removed)
        stack = self.stacks[0]
        return functools.partial(shared_prefill, stack.owner, stack.attr, self.prefix_states, batch, kept)

    def _greedy_config(self, decoding: Decoding):
        """The generation config the greedy loop decodes with, or None where it does not apply (beams, a
        setting it does not implement, ``fast_greedy`` off): ``generate`` decodes then."""
        if not self.fast_greedy or decoding.num_beams != 1 or not self._greedy_here():
            return None
        tok = self.tokenizer
        gc = generation_config(self.model, num_beams=1, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=_stop_ids(tok))
        return gc if unsupported(gc) is None and gc.forced_bos_token_id is None else None

    def rows_exact(self, src: str, tgt: str, decoding: Decoding) -> bool:
        return self._greedy_config(decoding) is not None

    def _limit_lengths(self, sources: list[str], src: str, tgt: str) -> list[int]:
        return [len(ids) for ids in self.tokenizer(sources, add_special_tokens=False)["input_ids"]]

    def teacher_forced(self, sources: list[str], targets: list[str], src: str, tgt: str) -> tuple[dict, torch.Tensor]:
        """Prompt + reference as one sequence; the mask marks positions that predict reference tokens."""
        tok = self.tokenizer
        rows, masks = [], []
        for s, t in zip(sources, targets):
            head = tok(self.prompt(s, src, tgt), add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None and not self.use_chat_template:
                head = [tok.bos_token_id] + head
            tail = tok(" " + t, add_special_tokens=False)["input_ids"][:256]
            rows.append(head + tail)
            masks.append([False] * (len(head) - 1) + [True] * len(tail) + [False])
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([m + [False] * (width - len(m)) for m in masks])
        return {"input_ids": ids.to(self.device), "attention_mask": attn.to(self.device)}, mask.to(self.device)


def _groups(rows: list[tuple[str, str, str]]) -> list:
    """A key per ``(source, src, tgt)`` row: one source into several languages shares its prompt's start."""
    return [(src, source) for source, src, _ in rows]


def _stop_ids(tok) -> list[int]:
    ids = [tok.eos_token_id]
    nl = tok.convert_tokens_to_ids("<0x0A>")
    if isinstance(nl, int) and nl != tok.unk_token_id:
        ids.append(nl)
    return [i for i in ids if i is not None]
