"""Exhaustive enumeration: every allowed prune set of ``min_size``..``max_size`` units, smallest
sizes first, in model order within a size. It builds ground-truth tables through the normal
driver and store: a killed build re-run reads every finished candidate from the store.

``max_size`` 0 means ``search.target_removed`` (or every size the space allows when unset).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations

from ..candidate import Candidate, Evaluation
from .base import BaseStrategy, StrategyError


def allowed_sets(space, min_size: int, max_size: int) -> Iterator[Candidate]:
    """Every prune set of ``min_size``..``max_size`` removable units that ``space`` allows, in order."""
    units = space.removable
    for k in range(min_size, max_size + 1):
        for combo in combinations(units, k):
            c = Candidate.of(combo)
            if space.allows(c):
                yield c


@dataclass
class ExhaustiveStrategy(BaseStrategy):
    name: str = "exhaustive"
    min_size: int = 1
    max_size: int = 0
    per_ask: int = 32  # candidates per ask: many at once keeps every actor busy
    _todo: Iterator[Candidate] | None = field(default=None, init=False, repr=False)

    @property
    def sizes(self) -> tuple[int, int]:
        top = self.max_size or self.stop.target_removed or len(self.space.removable) - 1
        return self.min_size, min(top, len(self.space.removable))

    def check(self) -> None:
        lo, hi = self.sizes
        if not 1 <= lo <= hi:
            raise StrategyError(f"search.options.exhaustive: min_size={self.min_size}, max_size={hi}: "
                                f"expected 1 <= min_size <= max_size <= {len(self.space.removable)}")

    def ask(self) -> list[Candidate]:
        if self.stop_reason:
            return []
        if self._todo is None:
            self._todo = allowed_sets(self.space, *self.sizes)
        want = self.per_ask if self.budget_left is None else min(self.per_ask, self.budget_left)
        out: list[Candidate] = []
        for c in self._todo:
            if c not in self.asked:
                out.append(c)
            if len(out) >= want:
                break
        out = self._take(out)
        if not out:
            self.stop_reason = "budget spent" if self.budget_left == 0 else "every allowed prune set asked"
        return out

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)

    def trace(self) -> dict:
        lo, hi = self.sizes
        best = self.best(self.stop.target_removed or hi)
        return {**super().trace(), "final": best["removed"] if best else [], "sizes": [lo, hi]}
