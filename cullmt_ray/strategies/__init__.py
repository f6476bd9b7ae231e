"""Search strategies, one module each, behind :class:`BaseStrategy`; :func:`make_strategy` builds one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BaseStrategy, SearchSpace, StopRule, StrategyError
from .beam import BeamStrategy
from .evolutionary import EvolutionaryStrategy
from .exhaustive import ExhaustiveStrategy
from .greedy import GreedyStrategy
from .hybrid import HybridStrategy
from .optuna_multi import MOTPEStrategy, MultiObjectiveStrategy
from .optuna_tpe import TPEStrategy
from .random_search import RandomStrategy

if TYPE_CHECKING:
    from ..candidate import Evaluation
    from ..config import SearchConfig

STRATEGIES: dict[str, type[BaseStrategy]] = {
    cls.name: cls for cls in (GreedyStrategy, BeamStrategy, RandomStrategy, EvolutionaryStrategy, TPEStrategy,
                              MultiObjectiveStrategy, MOTPEStrategy, HybridStrategy, ExhaustiveStrategy)
}


def make_strategy(search: SearchConfig, units: list[str], baseline: Evaluation, name: str | None = None,
                  max_evaluations: int | None = None, batch: int = 4,
                  target_removed: int | None = None) -> BaseStrategy:
    """The configured strategy (or ``name``) over ``units`` minus ``search.protect``, checked."""
    name = name or search.strategy
    bad = [u for u in search.protect if u not in units]
    if bad:
        raise StrategyError(f"search.protect: {bad[0]!r} is not a unit of this model ({units[0]} .. {units[-1]})")
    space = SearchSpace(units, frozenset(search.protect), baseline.score, baseline.params)
    stop = StopRule(search.threshold, target_removed if target_removed is not None else search.target_removed,
                    search.target_params_fraction,
                    max_evaluations if max_evaluations is not None else search.max_evaluations)
    return build_strategy(name, space, stop, search.seed, batch, search.options.get(name))


def build_strategy(name: str, space: SearchSpace, stop: StopRule, seed: int = 0, batch: int = 4,
                   options: dict | None = None) -> BaseStrategy:
    """A registered strategy over ``space`` with its options checked (the live driver and replay alike)."""
    if name not in STRATEGIES:
        raise StrategyError(f"strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    cls, opts = STRATEGIES[name], dict(options or {})
    unknown = [k for k in opts if k not in cls.options()]
    if unknown:
        raise StrategyError(f"search.options.{name}.{unknown[0]}: not an option of strategy {name!r}; "
                            f"expected one of {', '.join(cls.options()) or '(none)'}")
    strategy = cls(space=space, stop=stop, seed=seed, batch=batch, **opts)
    strategy.check()
    return strategy


__all__ = ["STRATEGIES", "BaseStrategy", "SearchSpace", "StopRule", "StrategyError", "build_strategy", "make_strategy"]
