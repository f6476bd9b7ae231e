"""Evolutionary search at a fixed size, in the spirit of EvoPress (arXiv 2410.14649).

One parent (the best prune set of the target size seen so far) makes ``batch`` offspring per
generation by swapping one or two removed units for kept ones; the best offspring replaces the
parent when it scores at least as well. It starts from the best known set of that size (seeded
from the store, e.g. greedy's result) or from a random batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..candidate import Candidate, Evaluation
from .base import BaseStrategy


@dataclass
class EvolutionaryStrategy(BaseStrategy):
    name: str = "evolutionary"
    fixed_size: ClassVar[bool] = True
    parent: Candidate | None = field(default=None, init=False)
    parent_score: float = field(default=float("-inf"), init=False)
    generations: list[dict] = field(default_factory=list)

    def seed_with(self, known: list[Evaluation]) -> None:
        k = self._target_size()
        for e in known:
            if len(e.candidate) == k and self.space.allows(e.candidate) and e.score > self.parent_score:
                self.parent, self.parent_score = e.candidate, e.score

    def _mutants(self, want: int) -> list[Candidate]:
        assert self.parent is not None
        removed = sorted(self.parent.removed)
        kept = [u for u in self.space.removable if u not in self.parent.removed]
        out: list[Candidate] = []
        for _ in range(100 * want):
            if len(out) >= want:
                break
            swaps = 1 if self.rng.random() < 0.7 or len(removed) < 2 else 2
            drop = self.rng.sample(removed, min(swaps, len(removed)))
            add = self.rng.sample(kept, min(len(drop), len(kept)))
            c = Candidate.of((set(removed) - set(drop)) | set(add))
            if c not in self.asked and c not in out and self.space.allows(c):
                out.append(c)
        return out

    def ask(self) -> list[Candidate]:
        if self.stop_reason:
            return []
        k = self._target_size()
        if self.budget_left == 0:
            self.stop_reason = "budget spent"
            return []
        if self.parent is None:
            pool = [self.space.random_candidate(k, self.rng) for _ in range(20 * self.batch)]
            out = self._take(list(dict.fromkeys(pool))[: self.batch])
        else:
            out = self._take(self._mutants(self.batch))
        if not out:
            self.stop_reason = "no unseen mutant of the parent left (local optimum)"
        return out

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)
        best = max(results, key=lambda e: (e.score, -e.params))
        improved = best.score >= self.parent_score
        if improved:
            self.parent, self.parent_score = best.candidate, best.score
        self.generations.append({"generation": len(self.generations) + 1, "offspring": len(results),
                                 "best_offspring": best.score, "parent": self.parent.units if self.parent else [],
                                 "parent_score": self.parent_score, "replaced": improved})

    def trace(self) -> dict:
        return {**super().trace(), "final": self.parent.units if self.parent else [],
                "generations": self.generations}
