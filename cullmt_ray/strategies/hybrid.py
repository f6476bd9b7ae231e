"""Greedy with a swap polish at every size: CULL-MT's step, then a local search that fixes the
step's usual failure (the best set of size k does not contain greedy's set of size k-1).

Each size: (1) *extend*: score every one-unit extension of the current set and keep the best, as
greedy does; (2) *polish* (from size ``polish_from`` on): try swapping each earlier-chosen unit
for one of the ``swap_pool`` units whose extension scored best at this step (the runners-up);
move to the best swap if it beats the current set, for at most ``rounds`` rounds. Swaps of the
unit just added were already scored by the extension step, so they are never asked again.
Ground truth (``bench/bench_ground_truth.py``, :mod:`cullmt_ray.replay`) picks the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..candidate import BASELINE, Candidate
from ..store import Evaluation
from .base import BaseStrategy, StrategyError


@dataclass
class HybridStrategy(BaseStrategy):
    name: str = "hybrid"
    swap_pool: int = 3  # runner-up units of the extension step tried as replacements (0: every kept unit)
    rounds: int = 2  # polish rounds per size
    polish_from: int = 2  # first size that is polished
    current: Candidate = BASELINE
    steps: list[dict] = field(default_factory=list)
    final: list[str] = field(default_factory=list)  # the last set within the threshold
    _best: Evaluation | None = field(default=None, init=False, repr=False)  # the current set's evaluation
    _phase: str = field(default="extend", init=False, repr=False)
    _pool: list[str] = field(default_factory=list, init=False, repr=False)
    _rounds_left: int = field(default=0, init=False, repr=False)

    def check(self) -> None:
        if self.swap_pool < 0 or self.rounds < 0 or self.polish_from < 1:
            raise StrategyError(f"search.options.hybrid: swap_pool={self.swap_pool}, rounds={self.rounds}, "
                                f"polish_from={self.polish_from}: expected swap_pool >= 0, rounds >= 0, polish_from >= 1")

    def ask(self) -> list[Candidate]:
        while not self.stop_reason:
            if self._phase == "extend":
                options = [self.current.with_removed(u) for u in self.space.removable if u not in self.current.removed]
            else:
                options = self._swaps()
            out = self._take(options)
            if out:
                return out
            if self.budget_left == 0:
                self.stop_reason = "budget spent"
            elif self._phase == "extend":
                self.stop_reason = "no removable unit left"
            else:
                self._size_done()
        return []

    def _swaps(self) -> list[Candidate]:
        """Every set that swaps one unit of the current set for one unit of the swap pool (already
        asked ones, e.g. the extension step's own alternatives, are skipped by ``_take``)."""
        pool = [u for u in self._pool if u not in self.current.removed]
        pool = pool if self.swap_pool == 0 else pool[: self.swap_pool]
        return [Candidate((self.current.removed - {a}) | {b}) for a in self.current.units for b in pool]

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)
        ranked = sorted(results, key=lambda e: (-e.score, e.params, e.candidate.units))
        best = ranked[0]
        if self._phase == "extend":
            self._pool = [u for e in ranked[1:] for u in sorted(e.candidate.removed - self.current.removed)]
            self._step("extend", best, len(results))
            self.current, self._best = best.candidate, best
            if len(self.current) >= self.polish_from and self.rounds > 0:
                self._phase, self._rounds_left = "polish", self.rounds
            else:
                self._size_done()
            return
        moved = best.score > self._best.score
        self._step("polish", best, len(results), moved)
        self._rounds_left -= 1
        if moved:
            self.current, self._best = best.candidate, best
        if not moved or self._rounds_left <= 0:
            self._size_done()

    def _step(self, kind: str, best: Evaluation, tried: int, moved: bool = True) -> None:
        self.steps.append({"step": len(self.steps) + 1, "kind": kind, "size": len(best.candidate), "tried": tried,
                           "best": best.candidate.units, "best_score": best.score, "params": best.params,
                           "drop": round(self.space.baseline_score - best.score, 4), "moved": moved})

    def _size_done(self) -> None:
        """Polish over at this size: stop past the threshold or at the target, else extend again."""
        self._phase = "extend"
        best = self._best
        drop = self.space.baseline_score - best.score
        if drop > self.stop.threshold:
            self.stop_reason = (f"the best set of size {len(best.candidate)} found drops {drop:.2f} points > "
                                f"threshold {self.stop.threshold}")
            return
        self.final = best.candidate.units
        if self.stop.size_reached(len(best.candidate), best.params, self.space.baseline_params):
            self.stop_reason = "size target reached"
        elif self.budget_left == 0:
            self.stop_reason = "budget spent"

    def trace(self) -> dict:
        return {**super().trace(), "final": self.final, "steps": self.steps,
                "options": {"swap_pool": self.swap_pool, "rounds": self.rounds, "polish_from": self.polish_from}}
