"""Beam search over prune sets: keep the ``width`` best sets of each size, extend each by one
unit, repeat. Width 1 is greedy (CULL-MT); a wider beam recovers from a greedy step that looked
best alone but combines badly (depth pruning is not monotone)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..candidate import BASELINE, Candidate, Evaluation
from .base import BaseStrategy


@dataclass
class BeamStrategy(BaseStrategy):
    name: str = "beam"
    width: int = 3
    beams: list[Candidate] = field(default_factory=lambda: [BASELINE])
    steps: list[dict] = field(default_factory=list)
    final: list[str] = field(default_factory=list)

    def ask(self) -> list[Candidate]:
        if self.stop_reason:
            return []
        options = [b.with_removed(u) for b in self.beams for u in self.space.removable if u not in b.removed]
        return self._offer(options, "no removable unit left")

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)
        ranked = sorted(results, key=lambda e: (e.partial, -e.score, e.params, e.candidate.units))
        best = ranked[0]
        drop = self.space.baseline_score - best.score
        step = {"step": len(self.steps) + 1, "size": len(best.candidate), "tried": len(results),
                "beam": [{"removed": e.candidate.units, "score": e.score} for e in ranked[: self.width]],
                "best_score": best.score, "drop": round(drop, 4), "params": best.params,
                "accepted": drop <= self.stop.threshold}
        self.steps.append(step)
        if not step["accepted"]:
            self.stop_reason = (f"the best set of size {len(best.candidate)} drops {drop:.2f} points > "
                                f"threshold {self.stop.threshold}")
            return
        self.beams = [e.candidate for e in ranked[: self.width]]
        self.final = best.candidate.units
        if reason := self._stop_after_step(best):
            self.stop_reason = reason

    def trace(self) -> dict:
        return {**super().trace(), "final": self.final, "width": self.width, "steps": self.steps}
