"""Unit names (``enc.3``, ``dec.0``, ``layer.5``, ``enc.1.expert.2``): stack and model order.

Plain Python (no torch), so that candidates, strategies and replay load without a model stack.
"""

from __future__ import annotations

_STACK_ORDER = {"enc": 0, "dec": 1, "layer": 2}


def unit_stack(unit: str) -> str:
    """The prefix of the layer stack a unit belongs to (``enc.3`` -> ``enc``)."""
    return unit.split(".", 1)[0]


def unit_sort_key(unit: str) -> tuple:
    """Model order: encoder before decoder, then numerically (``enc.2`` < ``enc.10`` < ``dec.0``)."""
    parts = unit.split(".")
    return (_STACK_ORDER.get(parts[0], 9), *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))
