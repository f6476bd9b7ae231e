"""A candidate is data: a frozen set of removed units; its key is canonical across runs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from .units import unit_sort_key


@dataclass(frozen=True)
class Candidate:
    """Units removed from the full model (the empty set is the unpruned baseline)."""

    removed: frozenset[str]

    @classmethod
    def of(cls, units: Iterable[str]) -> Candidate:
        return cls(frozenset(units))

    @property
    def units(self) -> list[str]:
        """Removed units in a stable order (enc before dec, numeric within)."""
        return sorted(self.removed, key=unit_sort_key)

    @property
    def key(self) -> str:
        """Canonical id: the same prune set has the same key in every run and strategy."""
        return hashlib.sha256(",".join(self.units).encode()).hexdigest()[:16]

    def with_removed(self, unit: str) -> Candidate:
        return Candidate(self.removed | {unit})

    def __len__(self) -> int:
        return len(self.removed)

    def __str__(self) -> str:
        return "{" + ", ".join(self.units) + "}" if self.removed else "{} (baseline)"


BASELINE = Candidate(frozenset())
