"""Greedy layer removal as in CULL-MT: each step scores every single further removal and
drops the least harmful unit, until the drop from the baseline passes the threshold or the
size target is reached. The step trace says what every step saw and chose."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..candidate import BASELINE, Candidate, Evaluation
from .base import BaseStrategy


@dataclass
class GreedyStrategy(BaseStrategy):
    name: str = "greedy"
    current: Candidate = BASELINE
    steps: list[dict] = field(default_factory=list)

    def ask(self) -> list[Candidate]:
        if self.stop_reason:
            return []
        options = [self.current.with_removed(u) for u in self.space.removable if u not in self.current.removed]
        return self._offer(options, "no removable unit left")

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)
        # Best score first; ties go to the smaller model, then to the first unit in model order. A
        # candidate that left a race early (partial) lost to a fully scored one, whatever its partial score.
        best = max(results, key=lambda e: (not e.partial, e.score, -e.params))
        drop = self.space.baseline_score - best.score
        step = {"step": len(self.steps) + 1, "from": self.current.units,
                "tried": {"+".join(sorted(r.candidate.removed - self.current.removed)): r.score for r in results},
                "best_unit": "+".join(sorted(best.candidate.removed - self.current.removed)),
                "best_score": best.score, "drop": round(drop, 4), "params": best.params}
        if raced := [r for r in results if r.partial]:
            step["raced_out"] = {"+".join(sorted(r.candidate.removed - self.current.removed)): r.sentences for r in raced}
        if drop > self.stop.threshold:
            step["accepted"] = False
            self.steps.append(step)
            self.stop_reason = f"the best next removal drops {drop:.2f} points > threshold {self.stop.threshold}"
            return
        step["accepted"] = True
        self.steps.append(step)
        self.current = best.candidate
        if reason := self._stop_after_step(best):
            self.stop_reason = reason

    def trace(self) -> dict:
        return {"strategy": self.name, "final": self.current.units, "stop_reason": self.stop_reason,
                "evaluations": len(self.asked), "steps": self.steps, "history": self.history}
