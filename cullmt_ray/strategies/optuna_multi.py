"""Multi-objective search with Optuna (NSGA-II or MOTPE): maximise the score and minimise the
parameters over prune sets of 1..``target_removed`` units; the study's Pareto front is the
answer directly. Each trial suggests a size and a priority per unit (see :mod:`.optuna_common`).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from ..candidate import Candidate, Evaluation
from .optuna_common import PRIORITY, OptunaStrategy, lowest_priority_set, priorities_of


@dataclass
class MultiObjectiveStrategy(OptunaStrategy):
    name: str = "nsga2"
    sampler: str = "nsga2"  # nsga2 | motpe
    population_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler == "nsga2":
            s = optuna.samplers.NSGAIISampler(seed=self.seed, population_size=self.population_size)
        else:
            s = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.population_size, multivariate=True)
        self.study = optuna.create_study(directions=["maximize", "minimize"], sampler=s)
        self.max_size = self.stop.target_removed or len(self.space.removable) - 1

    def _dist(self, name: str) -> optuna.distributions.BaseDistribution:
        return optuna.distributions.IntDistribution(1, self.max_size) if name == "n_removed" else PRIORITY

    def _suggest(self, trial: optuna.Trial) -> Candidate:
        size = trial.suggest_int("n_removed", 1, self.max_size)
        priority = {u: trial.suggest_float(u, 0.0, 1.0) for u in self.space.removable}
        return lowest_priority_set(self.space, priority, size)

    def _params(self, c: Candidate) -> dict:
        return priorities_of(self.space, c) | {"n_removed": len(c)}

    def _value(self, e: Evaluation) -> list[float]:
        return [e.score, float(e.params)]

    def _fits(self, c: Candidate) -> bool:
        return 0 < len(c) <= self.max_size and self.space.allows(c)

    def _random_unseen(self) -> Candidate | None:
        for _ in range(100):
            c = self.space.random_candidate(self.rng.randint(1, self.max_size), self.rng)
            if c not in self._known and c not in self.asked:
                return c
        return None

    def trace(self) -> dict:
        front = [{"removed": lowest_priority_set(self.space, t.params, t.params["n_removed"]).units,
                  "score": t.values[0], "params": t.values[1]} for t in self.study.best_trials]
        return {**super().trace(), "sampler": self.sampler, "study_front": front}


@dataclass
class MOTPEStrategy(MultiObjectiveStrategy):
    name: str = "motpe"
    sampler: str = "motpe"
