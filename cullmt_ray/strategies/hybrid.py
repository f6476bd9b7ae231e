"""Greedy guided by single-unit scores, with a swap polish and one set per stack mix: CULL-MT's
idea with fewer evaluations, fixing its usual failure (the best set of size k does not contain
greedy's set of size k-1) and covering the Pareto front, not only greedy's path.

Size 1 scores every single removal, as greedy's first step does. That gives each unit a *harm*
(baseline score minus its single-removal score), and a neighbour N of a scored set S is predicted
locally additively: score(S) - harm(added) + harm(dropped). Each further size then:

1. *extend*: the ``extend`` best-predicted one-unit extensions of the current set (0: all, as greedy);
2. *mix* (``mix``): for each way of spreading the size over the layer stacks (e.g. 3 encoder + 1
   decoder layers), the best scored set of a mix one unit smaller plus the least harmful unit of the
   missing stack, so that the front has a point at every parameter count the size allows;
3. *polish* (every size, or with ``polish_all`` off only the target size): the ``swaps``
   best-predicted one-unit swaps of the best set (and one within-stack swap of each other mix's
   best set), moving to the best swap while it improves, at most ``rounds`` rounds.

With a budget and a size target, extensions to the target are set aside first; budget left at the
target goes to within-stack swaps of every mix's best set (the front). Defaults come from the
ground-truth replay (``bench/bench_replay.py``, :mod:`cullmt_ray.replay`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from ..candidate import BASELINE, Candidate, Evaluation
from ..units import unit_stack
from .base import BaseStrategy, StrategyError


@dataclass
class HybridStrategy(BaseStrategy):
    name: str = "hybrid"
    extend: int = 2  # best-predicted extensions scored per size (0: every extension, as greedy)
    swaps: int = 2  # best-predicted swaps scored per polish round (0: no polish)
    rounds: int = 1  # polish rounds per size
    mix: bool = True  # also score the predicted best set of every stack mix of each size
    polish_all: bool = False  # polish every size (False: only the target size, when there is one)
    current: Candidate = BASELINE
    steps: list[dict] = field(default_factory=list)
    final: list[str] = field(default_factory=list)  # the best set of the last size within the threshold
    _scores: dict[Candidate, float] = field(default_factory=dict, init=False, repr=False)
    _harm: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _best: Evaluation | None = field(default=None, init=False, repr=False)
    _phase: str = field(default="extend", init=False, repr=False)
    _rounds_left: int = field(default=0, init=False, repr=False)

    def check(self) -> None:
        if min(self.extend, self.swaps, self.rounds) < 0:
            raise StrategyError(f"search.options.hybrid: extend={self.extend}, swaps={self.swaps}, "
                                f"rounds={self.rounds}: expected numbers >= 0")

    # --- predictions -----------------------------------------------------------------------

    def _predict(self, c: Candidate, base: Candidate | None = None) -> float:
        """Locally additive from a scored set ``base`` (default: the current set)."""
        base = self.current if base is None else base
        score = self._scores.get(base, self.space.baseline_score)
        added, dropped = c.removed - base.removed, base.removed - c.removed
        return score - sum(self._harm.get(u, 1e9) for u in added) + sum(self._harm.get(u, 0.0) for u in dropped)

    def _mix_swaps(self, size: int | None = None) -> list[Candidate]:
        """For each stack mix of ``size`` units (default: the current size, less the current set's mix),
        the best-predicted swap within a stack of its best scored set (same parameter count: it can
        only raise that point of the front)."""
        out = []
        for mix, c in self._best_of_mix(size or len(self.current)).items():
            if size is None and mix == _mix_of(self.current):
                continue
            options = [Candidate((c.removed - {a}) | {b}) for a in c.removed for b in self.space.removable
                       if b not in c.removed and unit_stack(a) == unit_stack(b)]
            fresh = [o for o in options if o not in self.asked and self.space.allows(o)]
            if fresh:
                out.append(max(fresh, key=lambda o: self._predict(o, c)))
        return out

    def _top(self, options: list[Candidate], n: int) -> list[Candidate]:
        fresh = [c for c in dict.fromkeys(options) if c not in self.asked and self.space.allows(c)]
        fresh.sort(key=lambda c: -self._predict(c))  # stable: ties keep model order
        return fresh if n == 0 else fresh[:n]

    def _best_of_mix(self, size: int) -> dict[tuple, Candidate]:
        """The best scored set of each stack mix of ``size`` units."""
        best: dict[tuple, Candidate] = {}
        for c, sc in self._scores.items():
            if len(c) == size and sc > self._scores.get(best.get(_mix_of(c)), float("-inf")):
                best[_mix_of(c)] = c
        return best

    def _mixes(self, size: int) -> list[Candidate]:
        """Per stack mix of ``size`` units, the best-predicted set: the best scored set of a mix one
        unit smaller plus the least harmful unit of the missing stack (it carries what that set
        learned about interactions); without one, the least harmful units of each stack."""
        stacks: dict[str, list[str]] = {}
        for u in sorted(self.space.removable, key=lambda u: self._harm.get(u, 1e9)):
            stacks.setdefault(unit_stack(u), []).append(u)
        names = list(stacks)
        parents = self._best_of_mix(size - 1)
        out = []
        for counts in product(*(range(len(stacks[s]) + 1) for s in names)):
            if sum(counts) != size:
                continue
            options = []
            for i, st in enumerate(names):
                if counts[i] == 0:
                    continue
                mix = tuple(sorted((n, c - (n == st)) for n, c in zip(names, counts) if c - (n == st) > 0))
                parent = parents.get(mix)
                if parent is not None:
                    u = next((u for u in stacks[st] if u not in parent.removed), None)
                    if u is not None:
                        options.append(parent.with_removed(u))
            if not options:
                options = [Candidate.of(u for s, n in zip(names, counts) for u in stacks[s][:n])]
            fresh = [c for c in options if c not in self.asked and self.space.allows(c)]
            if fresh:
                out.append(max(fresh, key=lambda c: max(self._predict(c, p) for p in parents.values()
                                                       if p.removed < c.removed) if any(
                    p.removed < c.removed for p in parents.values()) else self._predict(c, BASELINE)))
        return out

    # --- ask / tell ------------------------------------------------------------------------

    def ask(self) -> list[Candidate]:
        while not self.stop_reason:
            size = len(self.current) + 1
            if self._phase == "front":
                out = self._take([c for k in range(len(self.current), 1, -1) for c in self._mix_swaps(k)])
                if not out:
                    self.stop_reason = "size target reached"
                return out
            if self._phase == "extend":
                ext = [self.current.with_removed(u) for u in self.space.removable if u not in self.current.removed]
                want = self._top(ext, 0 if not self._harm else self.extend)
                if self._harm and self.mix:
                    extra = [c for c in self._top(self._mixes(size), 0) if c not in want]
                    want += extra[: self._spare(size)]
            else:
                units = [u for u in self.space.removable if u not in self.current.removed]
                want = self._top([Candidate((self.current.removed - {a}) | {b})
                                  for a in self.current.removed for b in units], self.swaps)
                if self.mix:
                    want += [c for c in self._mix_swaps() if c not in want]
                want = want[: self._spare(size - 1)]
            out = self._take(want)
            if out:
                return out
            if self._phase == "polish":
                self._size_done()  # nothing (affordable) left to swap: this size is done
            else:
                self.stop_reason = "budget spent" if self.budget_left == 0 else "no removable unit left"
        return []

    def _spare(self, size: int) -> int:
        """Budget left for mixes and swaps once the extensions to the target size are set aside."""
        if self.budget_left is None or self.stop.target_removed is None:
            return 1 << 30
        n = len(self.space.removable)
        steps = range(size, self.stop.target_removed)  # extensions still to come after this size
        need = sum(n - k if self.extend == 0 else min(self.extend, n - k) for k in steps)
        return max(0, self.budget_left - need - (0 if self._phase == "polish" else len(self._top(
            [self.current.with_removed(u) for u in self.space.removable if u not in self.current.removed],
            self.extend))))

    def tell(self, results: list[Evaluation]) -> None:
        self._record(results)
        for e in results:
            self._scores[e.candidate] = e.score
            if len(e.candidate) == 1:
                self._harm.setdefault(e.candidate.units[0], self.space.baseline_score - e.score)
        if self._phase == "front":
            self.steps.append({"step": len(self.steps) + 1, "kind": "front", "tried": len(results),
                               "best": [e.candidate.units for e in results if e.score > self._scores.get(
                                   self._best_of_mix(len(e.candidate)).get(_mix_of(e.candidate)), 0) - 1e-9]})
            return
        if self._phase == "extend":
            size = len(self.current) + 1
            same = [e for e in results if len(e.candidate) == size]
            best = max(same, key=lambda e: (e.score, -e.params))
            self._step("extend", best, len(results))
            self.current, self._best = best.candidate, best
            at_target = self.stop.target_removed is not None and size >= self.stop.target_removed
            if self.swaps and self.rounds and size > 1 and (self.polish_all or at_target or
                                                            self.stop.target_removed is None):
                self._phase, self._rounds_left = "polish", self.rounds
            else:
                self._size_done()
            return
        best = max(results, key=lambda e: (e.score, -e.params))  # mix swaps only count for the front
        moved = best.score > self._best.score
        self._step("polish", best, len(results), moved)
        self._rounds_left -= 1
        if moved:
            self.current, self._best = best.candidate, best
        if not moved or self._rounds_left <= 0:
            self._size_done()

    def _step(self, kind: str, best: Evaluation, tried: int, moved: bool = True) -> None:
        self.steps.append({"step": len(self.steps) + 1, "kind": kind, "size": len(best.candidate), "tried": tried,
                           "best": best.candidate.units, "best_score": best.score, "params": best.params,
                           "drop": round(self.space.baseline_score - best.score, 4), "moved": moved})

    def _size_done(self) -> None:
        """Polish over at this size: stop past the threshold or at the target, else extend again."""
        self._phase = "extend"
        best = self._best
        drop = self.space.baseline_score - best.score
        if drop > self.stop.threshold:
            self.stop_reason = (f"the best set of size {len(best.candidate)} drops {drop:.2f} points > "
                                f"threshold {self.stop.threshold}")
            return
        self.final = best.candidate.units
        if self.stop.size_reached(len(best.candidate), best.params, self.space.baseline_params):
            if self.mix and self.budget_left:  # budget left: raise the front's other stack mixes
                self._phase = "front"
            else:
                self.stop_reason = "size target reached"
        elif self.budget_left == 0:
            self.stop_reason = "budget spent"

    def trace(self) -> dict:
        return {**super().trace(), "final": self.final, "steps": self.steps,
                "options": {"extend": self.extend, "swaps": self.swaps, "rounds": self.rounds, "mix": self.mix,
                            "polish_all": self.polish_all}}


def _mix_of(c: Candidate) -> tuple:
    """How many units of each stack a set removes (its parameter count, for a dense model)."""
    counts: dict[str, int] = {}
    for u in c.removed:
        counts[unit_stack(u)] = counts.get(unit_stack(u), 0) + 1
    return tuple(sorted(counts.items()))
