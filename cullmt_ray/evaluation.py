"""The one evaluation service: store lookup -> evaluator pool -> store write -> metrics -> budget.

Every verb and both drivers (the local loop and the Ray Tune searcher) score candidates through
:class:`EvaluationService`, so a candidate is computed at most once per context, every result is
stored the moment it finishes, and the budget counters mean the same everywhere.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

from . import monitoring
from .candidate import Candidate, Evaluation
from .config import SearchRunConfig
from .data import DevSet, Direction, describe
from .metrics import METRICS, Metric
from .store import ResultStore

log = logging.getLogger("cullmt_ray")


class RunError(RuntimeError):
    """Evaluation cannot go on (an actor that keeps dying, a lost cluster); one line saying why."""


@dataclass
class EvalSet:
    """One evaluation context: the directions scored, how, and the store key of the whole setting."""

    directions: list[Direction]
    description: dict
    metric: Metric
    context: str = ""
    limit: int | None = None  # only the first ``limit`` sentences per direction (a low-fidelity stage)


@dataclass
class Budget:
    """What a run spent: full evaluations computed, read from the store, sentences generated and asked for."""

    evaluated: int = 0
    cached: int = 0
    sentences: int = 0
    requested: int = 0  # sentences of every evaluation asked for, computed or read (full-evaluation equivalents)

    def as_dict(self) -> dict:
        return {"evaluations": self.evaluated, "cached": self.cached, "sentences": self.sentences}


@dataclass
class EvaluationService:
    """Scores candidates in evaluation contexts: from the store where known, else on the pool."""

    cfg: SearchRunConfig
    pool: object  # EvaluatorPool (Ray); typed loosely so that this module stays Ray-free
    store: ResultStore
    devset: DevSet
    run_id: str
    budget: Budget = field(default_factory=Budget)
    _stages: dict[str, EvalSet] = field(default_factory=dict)
    poll_seconds: float = 0.5  # how often to look for a candidate another run is computing
    owner: str = ""  # this driver's name in the store's claims (host:pid:run)
    _keeper: object = None  # the claim-renewing thread's stop event

    def __post_init__(self) -> None:
        import socket
        import uuid

        self.owner = self.owner or f"{socket.gethostname()}:{os.getpid()}:{self.run_id}:{uuid.uuid4().hex[:6]}"

    def close(self) -> None:
        """Give up every claim (the candidates this driver did not finish) and stop renewing them."""
        if self._keeper is not None:
            self._keeper.set()
            self._keeper = None
        self.store.release_all(self.owner)

    def evalset(self, directions: list[Direction], limit: int | None = None, metric: str | None = None) -> EvalSet:
        """The context of scoring ``directions`` (first ``limit`` sentences; ``metric`` kl: the proxy)."""
        from .families import model_fingerprint

        info = self.pool.info[0]
        desc = {"model": model_fingerprint(self.cfg.model.name), "units": info["units"], "dtype": self.cfg.model.dtype,
                "eval": describe(self.devset, directions), "metric": self.cfg.metric.primary,
                "signatures": info["signatures"], "decoding": self.cfg.decoding.__dict__.copy()}
        if info.get("dispatch"):
            desc["moe_dispatch"] = info["dispatch"]
        es = EvalSet(list(directions), desc, METRICS[self.cfg.metric.primary])
        if limit is not None and limit < len(self.devset):
            es.limit = limit
            desc["first_sentences"] = limit
        if metric is not None and metric != self.cfg.metric.primary:
            es.metric = METRICS[metric]
            desc.update(proxy=metric, metric=metric)
        es.context = self.store.register_context(desc)
        return es

    # ------------------------------------------------------------------ the two halves (Tune uses them)
    def lookup(self, candidate: Candidate, es: EvalSet, strategy: str) -> Evaluation | None:
        hit = self.store.get(es.context, candidate)
        if hit is not None:
            self.budget.cached += 1
            monitoring.store_hit(self.run_id, strategy, hit)
        return hit

    def record(self, candidate: Candidate, result: dict, es: EvalSet, strategy: str) -> Evaluation:
        """Store a computed result (a merged pool result) and count it."""
        ev = Evaluation(candidate, result["score"], result["params"], result["bytes"], result["metrics"],
                        result["sentences"], result["seconds"], strategy, self.run_id, result["actor"])
        self.store.put(es.context, ev)
        monitoring.evaluated(ev)
        self.budget.evaluated += 1
        self.budget.sentences += ev.sentences
        return ev

    # ------------------------------------------------------------------ scoring
    def evaluate(self, candidates: list[Candidate], strategy: str, es: EvalSet) -> list[Evaluation]:
        """Scores in input order: from the store where known, else from the pool (and then stored)."""
        from tqdm import tqdm

        out: dict[Candidate, Evaluation] = {}
        waiting = list(dict.fromkeys(candidates))  # neither read nor claimed yet
        bar = tqdm(total=len(waiting), desc=f"{strategy}: evaluating", unit="cand", leave=False,
                   disable=os.environ.get("CULLMT_NO_PROGRESS") == "1")
        first = True
        while waiting:
            mine, taken = self.claim_or_read(waiting, es, strategy, out)
            bar.update(len(waiting) - len(mine) - len(taken))  # read from the store
            for cand, res in self.pool.evaluate(((c, es.directions) for c in mine), es.limit, es.metric.name):
                out[cand] = self.record(cand, res, es, strategy)
                bar.update(1)
            if taken and not mine:  # another run computes these: wait for its rows (or its claims to expire)
                if first:
                    log.info("%s: %d candidate(s) are being computed by another run; waiting for its results",
                             strategy, len(taken))
                    first = False
                time.sleep(self.poll_seconds)
            waiting = taken
        bar.close()
        self.budget.requested += sum(out[c].sentences for c in dict.fromkeys(candidates))
        return [out[c] for c in candidates]

    def claim_or_read(self, candidates: list[Candidate], es: EvalSet, strategy: str,
                      out: dict[Candidate, Evaluation]) -> tuple[list[Candidate], list[Candidate]]:
        """Read what the store has into ``out``; claim the rest: (claimed by us, claimed by another run)."""
        mine, taken = [], []
        for c in candidates:
            hit = self.lookup(c, es, strategy)
            if hit is not None:
                out[c] = hit
                continue
            state = self.store.claim(es.context, c, self.owner)
            if state == "stored":  # stored between the lookup and the claim
                out[c] = self.lookup(c, es, strategy)
            elif state == "mine":
                mine.append(c)
            else:
                taken.append(c)
        if mine and self._keeper is None:
            self._keeper = self.store.keep_claims(self.owner)
        return mine, taken

    def evaluate_staged(self, candidates: list[Candidate], strategy: str, es: EvalSet) -> list[Evaluation]:
        """Score a batch through the stages of ``search.fidelity`` (see :class:`FidelityConfig`): each
        stage scores what the previous one kept and passes on its best ``keep`` fraction; a candidate
        dropped at a stage keeps that stage's evaluation. A proxy's ranked score (negated KL) is below
        any BLEU, so a dropped candidate ranks under the decoded ones. No stage on: :meth:`evaluate`."""
        fid = self.cfg.search.fidelity
        stages = []
        if fid.proxy:
            stages.append(("proxy", {"metric": fid.proxy}))
        if fid.sentences is not None:
            stages.append(("low", {"limit": fid.sentences}))
        result: dict[Candidate, Evaluation] = {}
        todo = list(dict.fromkeys(candidates))
        for name, how in stages:
            if len(todo) < 2:
                break
            key = f"{name}|{','.join(map(str, es.directions))}"
            if key not in self._stages:
                self._stages[key] = self.evalset(es.directions, **how)
            scored = self.evaluate(todo, f"{strategy}:{name}", self._stages[key])
            result.update(zip(todo, scored))
            keep = max(1, math.ceil(fid.keep * len(todo)))
            todo = [e.candidate for e in sorted(scored, key=lambda e: (-e.score, e.params))[:keep]]
        result.update(zip(todo, self.evaluate(todo, strategy, es)))
        return [result[c] for c in candidates]
