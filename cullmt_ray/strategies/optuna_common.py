"""What the Optuna-backed strategies share: the priority encoding of a prune set, and an
ask/tell loop that never spends budget on a set already scored.

A trial suggests a priority in [0, 1] per removable unit (and maybe a size); the prune set is
that many units of lowest priority that the space allows, so every trial is feasible and the
mapping is deterministic. When the sampler keeps proposing known sets (it has converged), a
random unseen set is enqueued so that the budget still buys new information.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import optuna

from ..candidate import Candidate, Evaluation
from .base import BaseStrategy, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
PRIORITY = optuna.distributions.FloatDistribution(0.0, 1.0)


def lowest_priority_set(space: SearchSpace, priority: dict[str, float], size: int) -> Candidate:
    """The ``size`` removable units of lowest priority that the space allows together."""
    chosen: set[str] = set()
    for u in sorted(space.removable, key=lambda u: (priority[u], u)):
        if len(chosen) == size:
            break
        if space.allows(Candidate.of(chosen | {u})):
            chosen.add(u)
    return Candidate.of(chosen)


def priorities_of(space: SearchSpace, c: Candidate) -> dict[str, float]:
    """Priorities that map back to ``c``: removed units low, kept units high."""
    return {u: 0.1 if u in c.removed else 0.9 for u in space.removable}


@dataclass
class OptunaStrategy(BaseStrategy):
    """Base for strategies whose proposals come from an Optuna study (ask/tell interface)."""

    study: optuna.Study | None = field(default=None, init=False, repr=False)
    _pending: dict[Candidate, list] = field(default_factory=dict, init=False, repr=False)
    _known: dict[Candidate, float | list[float]] = field(default_factory=dict, init=False, repr=False)

    @abstractmethod
    def _suggest(self, trial: optuna.Trial) -> Candidate:
        """The prune set a trial stands for."""

    @abstractmethod
    def _params(self, c: Candidate) -> dict:
        """Trial parameters that map back to ``c`` (for seeding and enqueuing)."""

    @abstractmethod
    def _value(self, e: Evaluation) -> float | list[float]:
        """What the study optimises for one evaluation."""

    def keep_study(self, storage: optuna.storages.BaseStorage, name: str) -> None:
        """Keep the study in ``storage`` (the results database) as ``name``, before its first trial. A study
        of that name left by an earlier attempt of the run is replaced: the resumed run replays every
        stored result into the new one (nothing is recomputed), so it ends as an uninterrupted run's."""
        if self.study.trials:
            raise RuntimeError(f"{self.name}: keep_study after the study began")
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
        self.study = optuna.create_study(storage=storage, study_name=name, sampler=self.study.sampler,
                                         directions=self.study.directions)

    def _fits(self, c: Candidate) -> bool:
        return self.space.allows(c)

    def _random_unseen(self) -> Candidate | None:
        return None

    def seed_with(self, known: list[Evaluation]) -> None:
        for e in known:
            if not self._fits(e.candidate) or e.candidate in self._known:
                continue
            params = self._params(e.candidate)
            dists = {k: self._dist(k) for k in params}
            trial = optuna.trial.create_trial(params=params, distributions=dists, **self._told(self._value(e)))
            self.study.add_trial(trial)
            self._known[e.candidate] = self._value(e)

    def _dist(self, name: str) -> optuna.distributions.BaseDistribution:
        return PRIORITY

    @staticmethod
    def _told(value: float | list[float]) -> dict:
        return {"values": value} if isinstance(value, list) else {"value": value}

    def ask(self) -> list[Candidate]:
        if self.stop_reason:
            return []
        want = self.batch if self.budget_left is None else min(self.batch, self.budget_left)
        out: list[Candidate] = []
        repeats = 0
        while len(out) < want and repeats < 10 * self.batch:
            trial = self.study.ask()
            c = self._suggest(trial)
            if c in self._known:  # scored already: tell the known value, spend nothing
                self.study.tell(trial, self._known[c])
                repeats += 1
                if repeats % self.batch == 0 and (fresh := self._random_unseen()) is not None:
                    self.study.enqueue_trial(self._params(fresh))
            else:
                self._pending.setdefault(c, []).append(trial)
                if c not in out:
                    out.append(c)
        return self._offer(out, "the sampler proposes only known sets")

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)
        for r in results:
            self._known[r.candidate] = self._value(r)
            for trial in self._pending.pop(r.candidate, []):
                self.study.tell(trial, self._known[r.candidate])
