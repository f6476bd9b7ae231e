"""NLLB-MoE (``NllbMoeForConditionalGeneration``): units are experts, ``enc.L.expert.E`` / ``dec.L.expert.E``
for every sparse layer ``L``.

Applying a prune set masks the removed experts' router logits to -inf (the router can never pick
them; no weights are copied); leaving the context removes the masks. Gate statistics are read
from the routers while the model translates or scores references (:meth:`NllbMoeFamily.gate_stats`).
The corrected expert dispatch (:mod:`.nllb_moe_fix`) is installed on load: transformers' stock one
ignores the router's choice.

Export drops the removed experts and their router rows. When every sparse layer keeps the same
number of experts the folder is a stock NLLB-MoE checkpoint (``num_experts`` = that number); when
counts differ, ``num_experts`` is the largest count, the missing slots of smaller layers are absent
from the weights and ``config.json`` lists them under ``cullmt_missing_experts``:
:func:`load_pruned_moe` loads such a folder (plain ``from_pretrained`` would fill them randomly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import nllb_moe_fix
from ..units import expert_unit, moe_module_path, sort_units, split_expert
from .base import LayerStack, Size
from .encdec import EncoderDecoderFamily, _is_moe


class NllbMoeFamily(EncoderDecoderFamily):
    encoder_cache_mib = None  # gate statistics count the encoder's router calls while translating
    lockstep = False  # its layers route tokens to experts: the lockstep loop is for dense layers
    name = "moe"
    dispatch = nllb_moe_fix.DISPATCH_TAG  # recorded in every evaluation context

    def __init__(self, model: nn.Module, tokenizer, model_id: str):
        nllb_moe_fix.install()
        self.sparse: dict[str, nn.Module] = {}  # "enc.1" -> NllbMoeSparseMLP
        for prefix, part in (("enc", model.model.encoder), ("dec", model.model.decoder)):
            for i, layer in enumerate(part.layers):
                if getattr(layer, "is_sparse", False):
                    self.sparse[f"{prefix}.{i}"] = layer.ffn
        self.num_experts = model.config.num_experts  # router width (slots), the same in every layer
        self.experts_of = {layer: sorted(int(k.split("_")[1]) for k in mlp.experts if k.startswith("expert_"))
                           for layer, mlp in self.sparse.items()}  # present experts (a pruned export may lack some)
        super().__init__(model, tokenizer, model_id)

    def _greedy_config(self, tgt_id: int, decoding):
        """As the dense family's, while no expert drops tokens over its capacity: the eval capacity is then a
        fraction of the tokens in the batch, and the greedy loop's batches (finished rows dropped) would route
        differently from ``generate``'s."""
        fraction = getattr(self.model.config, "moe_eval_capacity_token_fraction", 1.0)
        return super()._greedy_config(tgt_id, decoding) if fraction is not None and fraction >= 1.0 else None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_moe(model) and hasattr(getattr(model, "model", None), "encoder")

    def _stacks(self) -> list[LayerStack]:
        return []  # units are experts, not layers

    # --------------------------------------------------------------- units and sizes
    def units(self) -> list[str]:
        return [expert_unit(layer, e) for layer, present in self.experts_of.items() for e in present]

    def _count_unit_params(self) -> dict[str, tuple[int, int]]:
        out = {}
        for layer, mlp in self.sparse.items():
            for e in self.experts_of[layer]:
                ps = list(mlp.experts[f"expert_{e}"].parameters())
                # the expert's router row goes with it
                w = mlp.router.classifier.weight
                out[expert_unit(layer, e)] = (sum(p.numel() for p in ps) + w.shape[1],
                                              sum(p.numel() * p.element_size() for p in ps) + w.shape[1] * w.element_size())
        return out

    def removed_by_layer(self, removed: Iterable[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {layer: [] for layer in self.sparse}
        for u in self.check_units(removed):
            layer, e = split_expert(u)
            out[layer].append(e)
        return {k: sorted(v) for k, v in out.items()}

    # --------------------------------------------------------------- pruning
    @contextmanager
    def apply(self, removed: Iterable[str]) -> Iterator[nn.Module]:
        """Within the context the routers cannot select ``removed`` experts (logits -inf)."""
        by_layer = self.removed_by_layer(removed)
        hooks = []
        try:
            self._enter()
            for layer, experts in by_layer.items():
                if experts:
                    hooks.append(self.sparse[layer].router.classifier.register_forward_hook(_masker(experts)))
            yield self.model
        finally:
            for h in hooks:
                h.remove()
            self._applied = False

    # --------------------------------------------------------------- gate statistics
    @torch.inference_mode()
    def gate_stats(self, batches: Iterable[Callable], sides: dict[str, str]) -> dict:
        """Router statistics while each of ``batches`` (a callable that runs the model) runs.

        Per sparse layer: tokens routed, top-1 and top-2 counts per expert, the sum of each
        expert's gate probability, and its importance (sum over its top-1 tokens of
        exp(top-1 probability), arXiv 2212.09811). Tokens the router drops (padding) are not
        counted. ``sides`` names the language of each side (``{"enc": src, "dec": tgt}``), kept in the result.
        """
        n = self.num_experts
        acc = {layer: {"tokens": 0, "top1": torch.zeros(n, dtype=torch.long), "top2": torch.zeros(n, dtype=torch.long),
                       "prob_sum": torch.zeros(n, dtype=torch.float64), "importance": torch.zeros(n, dtype=torch.float64)}
               for layer in self.sparse}
        pad = self.tokenizer.pad_token_id
        dec_valid: list[torch.Tensor | None] = [None]  # non-pad decoder inputs of the pass in flight

        def dec_inputs(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            dec_valid[0] = (ids != pad).reshape(-1) if ids is not None else None

        hooks = [self.model.model.decoder.register_forward_pre_hook(dec_inputs, with_kwargs=True)]
        for layer, mlp in self.sparse.items():
            def hook(mod, args, out, a=acc[layer], dec=layer.startswith("dec")):
                top_1_mask, _, logits = out
                valid = top_1_mask.sum(-1) > 0  # the encoder's router drops padding (and over-capacity) tokens
                if dec and dec_valid[0] is not None and dec_valid[0].shape == valid.shape:
                    valid = valid & dec_valid[0]  # the decoder's does not: skip pads of finished sequences
                if not bool(valid.any()):
                    return
                probs = torch.softmax(logits[valid].float(), dim=-1)
                conf, first = probs.max(-1)
                second = probs.masked_fill(torch.nn.functional.one_hot(first, n).bool(), -1.0).argmax(-1)
                a["tokens"] += int(valid.sum())
                a["top1"] += torch.bincount(first, minlength=n)
                a["top2"] += torch.bincount(second, minlength=n)
                a["prob_sum"] += probs.sum(0).double()
                a["importance"] += torch.zeros(n, dtype=torch.float64).index_add_(0, first, conf.exp().double())

            hooks.append(mlp.router.register_forward_hook(hook))
        try:
            for run in batches:
                run()
        finally:
            for h in hooks:
                h.remove()
        return {"sides": sides, "layers": {layer: {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in a.items()}
                                           for layer, a in acc.items()}}

    # --------------------------------------------------------------- export
    def export(self, removed: Iterable[str], out_dir: str | Path, card: dict | None = None) -> Path:
        """Save the model without ``removed`` experts (and their router rows); see the module doc."""
        import copy

        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        by_layer = self.removed_by_layer(removed)
        kept = {layer: [e for e in self.experts_of[layer] if e not in gone] for layer, gone in by_layer.items()}
        width = max(len(k) for k in kept.values())
        state = {}
        missing: dict[str, list[int]] = {}
        for name, t in self.model.state_dict().items():
            state[name] = t
        for layer, keep in kept.items():
            base = moe_module_path(layer)
            for e in range(self.num_experts):
                for k in [k for k in state if k.startswith(f"{base}.experts.expert_{e}.")]:
                    state.pop(k)
            for slot, e in enumerate(keep):
                src = self.sparse[layer].experts[f"expert_{e}"].state_dict()
                for k, v in src.items():
                    state[f"{base}.experts.expert_{slot}.{k}"] = v
            w = self.sparse[layer].router.classifier.weight
            rows = torch.zeros(width, w.shape[1], dtype=w.dtype)
            rows[: len(keep)] = w[keep]
            state[f"{base}.router.classifier.weight"] = rows
            if len(keep) < width:
                missing[base] = list(range(len(keep), width))
        config = copy.deepcopy(self.model.config)
        config.num_experts = width
        if missing:
            config.cullmt_missing_experts = missing
        config.dtype = self.save_dtype()
        config.save_pretrained(out)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(out)
        tied = {k for k in state if k.endswith(("lm_head.weight", "embed_tokens.weight"))}
        shared = next((k for k in ("model.shared.weight",) if k in state), None)
        save_file({k: v.to(config.dtype).contiguous() for k, v in state.items() if not (shared and k in tied)},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(out)
        self.write_card(out, sort_units(self.check_units(removed)), {
            "kept_experts": kept, "moe_dispatch": nllb_moe_fix.DISPATCH_TAG,
            "loader": "transformers" if not missing else "cullmt_ray.families.moe.load_pruned_moe", **(card or {})})
        from ..atomic import honour_umask

        honour_umask(out)
        return out


def _masker(experts: list[int]):
    def hook(mod, args, out):
        out = out.clone()
        out[..., experts] = float("-inf")
        return out

    return hook


def load_pruned_moe(path: str | Path, **kwargs) -> nn.Module:
    """Load an exported NLLB-MoE whose sparse layers keep different numbers of experts: the slots
    listed in ``config.cullmt_missing_experts`` are deleted and the router can never pick them."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    nllb_moe_fix.install()
    conf = AutoConfig.from_pretrained(str(path), trust_remote_code=kwargs.get("trust_remote_code", False))
    missing = getattr(conf, "cullmt_missing_experts", None) or {}
    level = hf_logging.get_verbosity()
    if missing:
        hf_logging.set_verbosity_error()  # the missing slots are expected; they are deleted below
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path), **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    for base, slots in missing.items():
        mlp = model.get_submodule(base)
        for s in slots:
            del mlp.experts[f"expert_{s}"]
        mlp.router.classifier.register_forward_hook(_masker(list(slots)))
    return model.eval()


__all__ = ["NllbMoeFamily", "Size", "load_pruned_moe"]
