"""Search strategies, one module each, behind :class:`BaseStrategy`."""

from .base import BaseStrategy, SearchSpace, StopRule, StrategyError
from .beam import BeamStrategy
from .evolutionary import EvolutionaryStrategy
from .exhaustive import ExhaustiveStrategy
from .greedy import GreedyStrategy
from .hybrid import HybridStrategy
from .optuna_multi import MOTPEStrategy, MultiObjectiveStrategy
from .optuna_tpe import TPEStrategy
from .random_search import RandomStrategy

STRATEGIES: dict[str, type[BaseStrategy]] = {
    "greedy": GreedyStrategy,
    "beam": BeamStrategy,
    "random": RandomStrategy,
    "evolutionary": EvolutionaryStrategy,
    "tpe": TPEStrategy,
    "nsga2": MultiObjectiveStrategy,
    "motpe": MOTPEStrategy,
    "exhaustive": ExhaustiveStrategy,
    "hybrid": HybridStrategy,
}

__all__ = [
    "STRATEGIES",
    "BaseStrategy",
    "BeamStrategy",
    "EvolutionaryStrategy",
    "ExhaustiveStrategy",
    "GreedyStrategy",
    "HybridStrategy",
    "MOTPEStrategy",
    "MultiObjectiveStrategy",
    "RandomStrategy",
    "SearchSpace",
    "StopRule",
    "StrategyError",
    "TPEStrategy",
]
