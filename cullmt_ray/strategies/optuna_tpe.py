"""Bayesian search with Optuna's TPE at a fixed size (``search.target_removed``).

Each trial suggests a priority per removable unit; the prune set is the ``target_removed``
units of lowest priority (see :mod:`.optuna_common`). Known evaluations of that size seed the
study, as Tune's ``points_to_evaluate``/``evaluated_rewards`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import optuna

from ..candidate import Candidate, Evaluation
from .optuna_common import OptunaStrategy, lowest_priority_set, priorities_of


@dataclass
class TPEStrategy(OptunaStrategy):
    name: str = "tpe"
    fixed_size: ClassVar[bool] = True
    n_startup_trials: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials, multivariate=True)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)

    def _suggest(self, trial: optuna.Trial) -> Candidate:
        priority = {u: trial.suggest_float(u, 0.0, 1.0) for u in self.space.removable}
        return lowest_priority_set(self.space, priority, self._target_size())

    def _params(self, c: Candidate) -> dict:
        return priorities_of(self.space, c)

    def _value(self, e: Evaluation) -> float:
        return e.score

    def _fits(self, c: Candidate) -> bool:
        return len(c) == self._target_size() and self.space.allows(c)

    def _random_unseen(self) -> Candidate | None:
        for _ in range(100):
            c = self.space.random_candidate(self._target_size(), self.rng)
            if c not in self._known and c not in self.asked:
                return c
        return None
