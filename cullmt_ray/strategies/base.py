"""The one interface every search strategy implements (as Optuna's ``BaseSampler``).

A strategy only proposes and observes: ``ask`` returns the candidates it wants scored next
(scored in parallel by the pool, or read from the store), ``tell`` gives it their results.
It never loads a model. An empty ``ask`` means the strategy is finished.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import ClassVar

from ..candidate import Candidate, Evaluation
from ..units import empties_a_group


class StrategyError(ValueError):
    """A strategy that cannot run with the given search settings; one line saying why."""


@dataclass
class SearchSpace:
    """What may be removed, and the baseline every score is compared to."""

    units: list[str]  # prunable units, in model order
    protected: frozenset[str] = frozenset()
    baseline_score: float = 0.0
    baseline_params: int = 0

    @property
    def removable(self) -> list[str]:
        return [u for u in self.units if u not in self.protected]

    def allows(self, candidate: Candidate) -> bool:
        """Protected units stay, and every stack (``enc``, ``dec``, ``layer``; each MoE layer) keeps a unit."""
        if candidate.removed & self.protected:
            return False
        return empties_a_group(self.units, candidate.removed) is None

    def random_candidate(self, size: int, rng: random.Random) -> Candidate:
        """A uniformly drawn allowed prune set of ``size`` units (rejection sampling)."""
        for _ in range(10_000):
            c = Candidate.of(rng.sample(self.removable, size))
            if self.allows(c):
                return c
        raise StrategyError(f"search.target_removed={size}: no allowed prune set of that size")


@dataclass
class StopRule:
    """When a search stops: quality drop past ``threshold`` points, or a size/unit target reached."""

    threshold: float = 1.0  # max allowed drop of the primary metric from the baseline, in points
    target_removed: int | None = None  # stop once this many units are removed
    target_params_fraction: float | None = None  # stop once params <= this fraction of the baseline
    max_evaluations: int | None = None  # budget in (non-cached) full evaluations

    def size_reached(self, n_removed: int, params: int, baseline_params: int) -> bool:
        if self.target_removed is not None and n_removed >= self.target_removed:
            return True
        return self.target_params_fraction is not None and params <= self.target_params_fraction * baseline_params


@dataclass
class BaseStrategy(ABC):
    """Propose candidates, observe their evaluations.

    The budget (``stop.max_evaluations``) counts the distinct candidates a strategy asks for,
    whether the store already knew them or not: strategies compared on one store get the same
    budget, while no candidate is ever computed twice.
    """

    space: SearchSpace
    stop: StopRule = field(default_factory=StopRule)
    seed: int = 0
    name: str = "base"
    batch: int = 4  # candidates per ask, for strategies that sample (about the number of actors)
    asked: set[Candidate] = field(default_factory=set, repr=False)
    history: list[dict] = field(default_factory=list, repr=False)  # every evaluation told, in order
    stop_reason: str = ""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @abstractmethod
    def ask(self) -> list[Candidate]:
        """The next candidates to score; an empty list when finished."""

    @abstractmethod
    def tell(self, results: list[Evaluation]) -> None:
        """Results for the candidates of the last ``ask``, in the same order."""

    fixed_size: ClassVar[bool] = False  # searches prune sets of exactly ``stop.target_removed`` units

    @classmethod
    def options(cls) -> list[str]:
        """Fields a config may set under ``search.options.<name>``."""
        base = {f.name for f in fields(BaseStrategy)}
        return [f.name for f in fields(cls) if f.name not in base and f.init and not f.name.startswith("_")
                and f.type in ("int", "float", "str", "bool")]

    def check(self) -> None:
        """Raise :class:`StrategyError` when the search settings do not suit this strategy."""
        if self.fixed_size:
            self._target_size()

    def seed_with(self, known: list[Evaluation]) -> None:
        """Start from evaluations other strategies already made (default: ignore them)."""

    @property
    def budget_left(self) -> int | None:
        return None if self.stop.max_evaluations is None else max(0, self.stop.max_evaluations - len(self.asked))

    def _take(self, candidates: list[Candidate]) -> list[Candidate]:
        """Keep the allowed, not yet asked candidates that fit the budget; mark them asked."""
        out = [c for c in dict.fromkeys(candidates) if c not in self.asked and self.space.allows(c)]
        if self.budget_left is not None:
            out = out[: self.budget_left]
        self.asked.update(out)
        return out

    def _offer(self, candidates: list[Candidate], exhausted: str) -> list[Candidate]:
        """:meth:`_take`, and when nothing is left to ask, stop: the budget is spent, or ``exhausted``."""
        out = self._take(candidates)
        if not out:
            self.stop_reason = "budget spent" if self.budget_left == 0 else exhausted
        return out

    def _record(self, results: list[Evaluation]) -> None:
        for r in results:
            self.history.append({"n": len(self.history) + 1, "removed": r.candidate.units, "score": r.score,
                                 "params": r.params})

    def _target_size(self) -> int:
        k = self.stop.target_removed
        if k is None or not 0 < k < len(self.space.removable):
            raise StrategyError(f"search.target_removed={k!r}: strategy {self.name!r} searches prune sets of a "
                                f"fixed size; expected 1..{len(self.space.removable) - 1}")
        return k

    def _stop_after_step(self, best: Evaluation) -> str:
        """For stepwise strategies: why to stop after accepting ``best`` ('' to go on)."""
        if self.stop.size_reached(len(best.candidate), best.params, self.space.baseline_params):
            return "size target reached"
        return "budget spent" if self.budget_left == 0 else ""

    def best(self, size: int | None = None) -> dict | None:
        """The best evaluation told so far (of ``size`` units when given)."""
        rows = [h for h in self.history if size is None or len(h["removed"]) == size]
        return max(rows, key=lambda h: (h["score"], -h["params"])) if rows else None

    def trace(self) -> dict:
        """What the strategy did, for the run folder (JSON-able)."""
        best = self.best(self.stop.target_removed) if self.stop.target_removed else self.best()
        return {"strategy": self.name, "final": best["removed"] if best else [], "stop_reason": self.stop_reason,
                "evaluations": len(self.asked), "history": self.history}
