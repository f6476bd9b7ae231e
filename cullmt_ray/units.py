"""Unit names, parsed in one place: ``enc.3`` / ``dec.0`` (encoder-decoder layers), ``layer.5``
(decoder-only blocks) and ``enc.1.expert.3`` (an NLLB-MoE expert). Torch-free."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

STACKS = ("enc", "dec", "layer")
_STACK_ORDER = {s: i for i, s in enumerate(STACKS)}
_UNIT = re.compile(r"^(enc|dec|layer)\.(\d+)(?:\.expert\.(\d+))?$")


class UnitError(ValueError):
    """A unit name that is not ``enc.I``, ``dec.I``, ``layer.I`` or ``enc.I.expert.E``."""


@dataclass(frozen=True, order=True)
class Unit:
    """A parsed unit: its stack, layer index and (for an MoE expert) expert index."""

    stack: str
    layer: int
    expert: int | None = None

    @property
    def layer_name(self) -> str:
        """The layer the unit sits in (``enc.1`` for ``enc.1.expert.3``)."""
        return f"{self.stack}.{self.layer}"

    def __str__(self) -> str:
        return self.layer_name if self.expert is None else f"{self.layer_name}.expert.{self.expert}"


def parse_unit(name: str) -> Unit:
    m = _UNIT.match(str(name).strip())
    if not m:
        raise UnitError(f"unit {name!r}: expected enc.I, dec.I, layer.I or enc.I.expert.E (e.g. enc.3, dec.0.expert.1)")
    return Unit(m[1], int(m[2]), None if m[3] is None else int(m[3]))


def parse_units(spec: str | Iterable[str]) -> list[str]:
    """``"enc.1, enc.3"`` or a list -> checked unit names in model order (empty entries dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return sort_units({str(parse_unit(u)) for u in items if str(u).strip()})


def unit_stack(unit: str) -> str:
    """The layer stack a unit belongs to (``enc.3`` -> ``enc``)."""
    return parse_unit(unit).stack


def expert_unit(layer: str, expert: int) -> str:
    """(``enc.1``, 3) -> ``enc.1.expert.3``."""
    return f"{layer}.expert.{expert}"


def moe_module_path(layer: str) -> str:
    """``enc.1`` -> ``model.encoder.layers.1.ffn``: an NLLB-MoE sparse layer's module (what a pruned export files its
    missing experts under)."""
    side, i = layer.split(".")
    return f"model.{'encoder' if side == 'enc' else 'decoder'}.layers.{i}.ffn"


def split_expert(unit: str) -> tuple[str, int]:
    """``enc.1.expert.3`` -> (``enc.1``, 3)."""
    u = parse_unit(unit)
    if u.expert is None:
        raise UnitError(f"unit {unit!r} is a layer, not an expert (expected enc.I.expert.E)")
    return u.layer_name, u.expert


def unit_sort_key(unit: str) -> tuple:
    """Model order: encoder before decoder, then numerically (``enc.2`` < ``enc.10`` < ``dec.0``);
    names that are not units sort last, by name."""
    m = _UNIT.match(unit)
    if not m:
        return len(STACKS), 0, 0, unit
    return _STACK_ORDER[m[1]], int(m[2]), -1 if m[3] is None else int(m[3]), ""


def sort_units(units: Iterable[str]) -> list[str]:
    return sorted(units, key=unit_sort_key)


def group_count(units: Iterable[str]) -> dict[str, int]:
    """How many units each group holds: layers per stack, experts per layer (what must keep >= 1)."""
    out: dict[str, int] = {}
    for name in units:
        u = parse_unit(name)
        key = u.stack if u.expert is None else u.layer_name
        out[key] = out.get(key, 0) + 1
    return out


def empties_a_group(all_units: Iterable[str], removed: Iterable[str]) -> str | None:
    """The stack (or MoE layer) that ``removed`` would leave empty, else None."""
    left = group_count(all_units)
    for key, n in group_count(removed).items():
        if left.get(key, 0) - n <= 0:
            return key
    return None
