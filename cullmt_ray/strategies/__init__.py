"""Search strategies, one module each, behind :class:`BaseStrategy`; :func:`make_strategy` builds one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BaseStrategy, SearchSpace, StopRule, StrategyError
from .beam import BeamStrategy
from .evolutionary import EvolutionaryStrategy
from .greedy import GreedyStrategy
from .optuna_multi import MOTPEStrategy, MultiObjectiveStrategy
from .optuna_tpe import TPEStrategy
from .random_search import RandomStrategy

if TYPE_CHECKING:
    from ..candidate import Evaluation
    from ..config import SearchConfig

STRATEGIES: dict[str, type[BaseStrategy]] = {
    cls.name: cls for cls in (GreedyStrategy, BeamStrategy, RandomStrategy, EvolutionaryStrategy, TPEStrategy,
                              MultiObjectiveStrategy, MOTPEStrategy)
}


def make_strategy(search: SearchConfig, units: list[str], baseline: Evaluation, name: str | None = None,
                  max_evaluations: int | None = None, batch: int = 4,
                  target_removed: int | None = None) -> BaseStrategy:
    """The configured strategy (or ``name``) over ``units`` minus ``search.protect``, checked."""
    name = name or search.strategy
    if name not in STRATEGIES:
        raise StrategyError(f"search.strategy={name!r}: expected one of {', '.join(STRATEGIES)}")
    bad = [u for u in search.protect if u not in units]
    if bad:
        raise StrategyError(f"search.protect: {bad[0]!r} is not a unit of this model ({units[0]} .. {units[-1]})")
    space = SearchSpace(units, frozenset(search.protect), baseline.score, baseline.params)
    stop = StopRule(search.threshold, target_removed if target_removed is not None else search.target_removed,
                    search.target_params_fraction,
                    max_evaluations if max_evaluations is not None else search.max_evaluations)
    strategy = STRATEGIES[name](space=space, stop=stop, seed=search.seed, batch=batch,
                                **(search.options.get(name) or {}))
    strategy.check()
    return strategy


__all__ = ["STRATEGIES", "BaseStrategy", "SearchSpace", "StopRule", "StrategyError", "make_strategy"]
