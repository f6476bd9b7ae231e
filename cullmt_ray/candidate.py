"""What a search handles, as data: a :class:`Candidate` (a prune set with a canonical key) and its
:class:`Evaluation` (its scores and size). Torch-free."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from .units import parse_units, sort_units


@dataclass(frozen=True)
class Candidate:
    """Units removed from the full model (the empty set is the unpruned baseline)."""

    removed: frozenset[str]

    @classmethod
    def of(cls, units: Iterable[str]) -> Candidate:
        return cls(frozenset(units))

    @classmethod
    def parse(cls, spec: str | Iterable[str]) -> Candidate:
        """From ``"enc.1,enc.3"`` or a list, every name checked (:func:`cullmt_ray.units.parse_unit`)."""
        return cls(frozenset(parse_units(spec)))

    @property
    def units(self) -> list[str]:
        """Removed units in a stable order (enc before dec, numeric within)."""
        return sort_units(self.removed)

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


@dataclass(frozen=True)
class Evaluation:
    """One scored candidate: primary score (higher is better), size, every metric per direction."""

    candidate: Candidate
    score: float
    params: int
    bytes: int
    metrics: dict
    sentences: int  # sentences generated (the budget unit)
    seconds: float
    strategy: str | None = None
    run: str | None = None
    actor: str | None = None
    cached: bool = field(default=False, compare=False)  # read from the store, not computed now
    # scored on part of the dev set only (left a race early, search.racing): ranks below every full score
    partial: bool = field(default=False, compare=False)

    def as_row(self) -> dict:
        return {"candidate": self.candidate.key, "units": self.candidate.units, "n_removed": len(self.candidate),
                "params": self.params, "bytes": self.bytes, "score": self.score, "metrics": self.metrics,
                "sentences": self.sentences, "seconds": self.seconds, "strategy": self.strategy,
                "run": self.run, "actor": self.actor}
