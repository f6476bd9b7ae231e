"""Random search: uniformly drawn prune sets of the target size, the floor every strategy
must beat."""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import ClassVar

from ..candidate import Candidate, Evaluation
from .base import BaseStrategy


@dataclass
class RandomStrategy(BaseStrategy):
    name: str = "random"
    fixed_size: ClassVar[bool] = True

    def ask(self) -> list[Candidate]:
        if self.stop_reason:
            return []
        k = self._target_size()
        room = comb(len(self.space.removable), k) - len(self.asked)
        want = min(self.batch, room, self.budget_left if self.budget_left is not None else self.batch)
        out: list[Candidate] = []
        for _ in range(200 * max(want, 1)):
            if len(out) >= want:
                break
            c = self.space.random_candidate(k, self.rng)
            if c not in self.asked and c not in out:
                out.append(c)
        return self._offer(out, "every prune set of that size tried")

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)
