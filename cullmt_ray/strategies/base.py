"""The one interface every search strategy implements (as Optuna's ``BaseSampler``).

A strategy only proposes and observes: ``ask`` returns the candidates it wants scored next
(scored in parallel by the pool, or read from the store), ``tell`` gives it their results.
It never loads a model. An empty ``ask`` means the strategy is finished.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..candidate import Candidate
from ..store import Evaluation


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
        """Protected units stay, and every stack (``enc``, ``dec``, ``layer``) keeps at least one unit."""
        if candidate.removed & self.protected:
            return False
        stacks: dict[str, int] = {}
        for u in self.units:
            stacks[u.rsplit(".", 1)[0]] = stacks.get(u.rsplit(".", 1)[0], 0) + 1
        for u in candidate.removed:
            stacks[u.rsplit(".", 1)[0]] -= 1
        return all(n > 0 for n in stacks.values())


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
    """Propose candidates, observe their evaluations."""

    space: SearchSpace
    stop: StopRule = field(default_factory=StopRule)
    seed: int = 0
    name: str = "base"

    @abstractmethod
    def ask(self) -> list[Candidate]:
        """The next candidates to score; an empty list when finished."""

    @abstractmethod
    def tell(self, results: list[Evaluation]) -> None:
        """Results for the candidates of the last ``ask``, in the same order."""

    def trace(self) -> dict:
        """What the strategy did, for the run folder (JSON-able)."""
        return {}
