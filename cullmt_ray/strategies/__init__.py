"""Search strategies, one module each, behind :class:`BaseStrategy`."""

from .base import BaseStrategy, SearchSpace, StopRule
from .greedy import GreedyStrategy

STRATEGIES: dict[str, type[BaseStrategy]] = {"greedy": GreedyStrategy}

__all__ = ["BaseStrategy", "GreedyStrategy", "SearchSpace", "StopRule", "STRATEGIES"]
