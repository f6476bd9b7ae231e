"""One small interface per model family: units, apply a prune set, size, translate, export.

A family never copies weights to make a candidate: ``apply`` re-slices the layer
``ModuleList``s, renumbers every remaining layer's ``layer_idx`` (the KV cache indexes by
it) and updates the config's layer counts; leaving the context restores all of it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..units import unit_sort_key, unit_stack  # noqa: F401  (re-exported: families' public names)


class FamilyError(ValueError):
    """A model or prune set a family cannot handle; one line naming the bad value."""


@dataclass(frozen=True)
class Size:
    """Size of a (pruned) model: parameters and bytes at the loaded dtype."""

    params: int
    bytes: int


@dataclass
class LayerStack:
    """A prunable ``ModuleList``: unit ids are ``{prefix}.{i}``."""

    prefix: str
    owner: nn.Module  # the module whose attribute ``attr`` is the ModuleList
    attr: str
    count_fields: tuple[str, ...]  # config fields holding the layer count
    list_fields: tuple[str, ...] = ()  # per-layer config lists sliced along (e.g. layer_types)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.owner, self.attr)


@dataclass(frozen=True)
class Decoding:
    """Decoding settings; part of every evaluation's identity."""

    num_beams: int = 1
    max_new_tokens: int = 128
    batch_size: int = 32


class ModelFamily(ABC):
    """A loaded model plus what is needed to prune, size, run and save it."""

    name: str = "base"

    def __init__(self, model: nn.Module, tokenizer, model_id: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.stacks = self._stacks()
        self._unit_params = self._count_unit_params()
        self._applied = False

    # --------------------------------------------------------------- what a family defines
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this family can handle ``model``."""

    @abstractmethod
    def _stacks(self) -> list[LayerStack]:
        """The model's prunable layer stacks."""

    @abstractmethod
    def _generate(self, sources: list[str], src: str, tgt: str, decoding: Decoding) -> list[str]:
        """Translate one batch (already length-sorted) from ``src`` to ``tgt`` (NLLB codes)."""

    # --------------------------------------------------------------- units and sizes
    def units(self) -> list[str]:
        """All prunable unit ids, e.g. ``enc.0 ... dec.5`` or ``layer.0 ...``."""
        return [f"{s.prefix}.{i}" for s in self.stacks for i in range(len(s.layers))]

    def check_units(self, removed: Iterable[str]) -> frozenset[str]:
        removed = frozenset(removed)
        known = set(self.units())
        bad = sorted(removed - known)
        if bad:
            raise FamilyError(f"unit {bad[0]!r} is not in this model; its units are {self.units()[0]} .. "
                              f"{self.units()[-1]}")
        for s in self.stacks:
            if all(f"{s.prefix}.{i}" in removed for i in range(len(s.layers))):
                raise FamilyError(f"prune set removes every layer of '{s.prefix}'; keep at least one")
        return removed

    def _count_unit_params(self) -> dict[str, tuple[int, int]]:
        out = {}
        for s in self.stacks:
            for i, layer in enumerate(s.layers):
                ps = list(layer.parameters())
                out[f"{s.prefix}.{i}"] = (sum(p.numel() for p in ps),
                                          sum(p.numel() * p.element_size() for p in ps))
        return out

    def size(self, removed: Iterable[str] = ()) -> Size:
        """Parameters and bytes of the model with ``removed`` units taken out."""
        seen, params, nbytes = set(), 0, 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
                nbytes += p.numel() * p.element_size()
        for u in self.check_units(removed):
            params -= self._unit_params[u][0]
            nbytes -= self._unit_params[u][1]
        return Size(params, nbytes)

    # --------------------------------------------------------------- pruning
    @contextmanager
    def apply(self, removed: Iterable[str]) -> Iterator[nn.Module]:
        """Within the context the model lacks ``removed`` units; weights are shared, never copied."""
        removed = self.check_units(removed)
        if self._applied:
            raise FamilyError("a prune set is already applied; prune sets do not nest")
        saved = []
        config = self.model.config
        try:
            self._applied = True
            for s in self.stacks:
                full = s.layers
                keep = [i for i in range(len(full)) if f"{s.prefix}.{i}" not in removed]
                fields = {f: getattr(config, f) for f in s.count_fields + s.list_fields}
                idx = [(m, m.layer_idx) for layer in full for m in layer.modules() if hasattr(m, "layer_idx")]
                saved.append((s, full, fields, idx))
                setattr(s.owner, s.attr, nn.ModuleList([full[i] for i in keep]))
                for new, i in enumerate(keep):
                    for m in full[i].modules():
                        if hasattr(m, "layer_idx"):
                            m.layer_idx = new
                for f in s.count_fields:
                    setattr(config, f, len(keep))
                for f in s.list_fields:
                    if fields[f] is not None:
                        setattr(config, f, [fields[f][i] for i in keep])
            yield self.model
        finally:
            for s, full, fields, idx in reversed(saved):
                setattr(s.owner, s.attr, full)
                for f, v in fields.items():
                    setattr(config, f, v)
                for m, v in idx:
                    m.layer_idx = v
            self._applied = False

    # --------------------------------------------------------------- translation
    @torch.inference_mode()
    def translate(self, sources: list[str], src: str, tgt: str, decoding: Decoding = Decoding()) -> list[str]:
        """Batched, length-sorted translation; outputs come back in input order."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
        out: list[str] = [""] * len(sources)
        for b in range(0, len(order), decoding.batch_size):
            idx = order[b : b + decoding.batch_size]
            for i, hyp in zip(idx, self._generate([sources[i] for i in idx], src, tgt, decoding)):
                out[i] = hyp.strip()
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --------------------------------------------------------------- export
    def export(self, removed: Iterable[str], out_dir: str | Path, card: dict | None = None) -> Path:
        """Save the pruned model + tokenizer so plain ``from_pretrained`` loads it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        removed = sorted(self.check_units(removed), key=unit_sort_key)
        with self.apply(removed) as model:
            model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        meta = {"base_model": self.model_id, "family": self.name, "removed_units": removed,
                "size": self.size(removed).__dict__, **(card or {})}
        (out / "cullmt_ray.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return out
