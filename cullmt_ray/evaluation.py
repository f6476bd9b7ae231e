"""The one evaluation service: store lookup -> evaluator pool -> store write -> metrics -> budget.

Every verb and both drivers (the local loop and the Ray Tune searcher) score candidates through
:class:`EvaluationService`, so a candidate is computed at most once per context, every result is
stored the moment it finishes, and the budget counters mean the same everywhere.
"""

from __future__ import annotations

import logging
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from . import monitoring
from .candidate import Candidate, Evaluation
from .config import SearchRunConfig
from .data import DevSet, Direction, describe
from .metrics import METRICS, Metric
from .store import ResultStore

log = logging.getLogger("cullmt_ray")


RACED = ("greedy", "beam")  # strategies whose steps search.racing races (they rank partial evaluations last)
RACED_KEPT = 64  # raced-out candidates whose hypotheses a run keeps, for completing the Pareto front
# a race round's leaders whose next chunk an actor runs when the round leaves it idle (its other tasks taken, others
# still running): decoded ahead, used by the next round unless the leader is raced out first
FILLERS = 2


class _Left(NamedTuple):
    """A candidate that left a race: its score on the sentences it saw, why it left, and what bounds its full score
    (its own bootstrap quantile; the candidate it lost to and their paired margin)."""

    score: float
    seen: int
    why: str
    upper: float
    lost_to: Candidate
    margin: float


class _Decoded(NamedTuple):
    """What a raced-out candidate decoded in its race: the first ``seen`` sentences per direction (hypotheses and
    sentence statistics per direction, cost), kept so that completing the front decodes only the rest
    (:meth:`EvaluationService.complete_front`)."""

    seen: int
    hyps: dict
    cost: dict
    stats: dict


def _nothing_decoded(candidates: list[Candidate], names: list) -> tuple[dict, dict, dict]:
    """Empty hypotheses and sentence statistics per direction, and a zero cost, for each candidate (:func:`_add_part`
    fills them)."""
    return ({c: {d: [] for d in names} for c in candidates}, {c: {d: [] for d in names} for c in candidates},
            {c: {"sentences": 0, "seconds": 0.0, "actors": set()} for c in candidates})


def _add_part(part: dict, hyps: dict, cost: dict, stats: dict | None = None) -> None:
    """Add an actor's race chunk (:meth:`EvaluatorActor.sentence_stats`) to a candidate's hypotheses, sentence
    statistics (per direction) and cost."""
    for d, p in zip(part["directions"], part["parts"]):
        hyps[d].extend(p["hyps"])
        if stats is not None:
            stats[d].extend(p["stats"])
    cost["sentences"] += part["sentences"]
    cost["seconds"] += part["seconds"]
    cost["actors"].add(part["actor"])
    cost["params"], cost["bytes"] = part["params"], part["bytes"]


def _sacre(es: "EvalSet"):
    """The sacrebleu metric object that scores summed statistics of ``es``'s metric, where it is not BLEU."""
    if es.metric.name in ("spbleu", "bleu"):
        return None
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2)


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
    racing: bool = False  # greedy/beam steps race (SearchConfig.races)
    race_log: list[dict] = field(default_factory=list)  # one entry per raced step (search.racing)
    _scorer: object = None  # the driver's Scorer for race survivors (built on first use)
    # (context, candidate) -> what this run's raced-out candidates decoded (_Decoded)
    _raced: dict = field(default_factory=dict)
    # (context, candidate) -> sentence statistics per direction of this run's full evaluations decoded in races
    # (paired references when completing the front)
    _stats: dict = field(default_factory=dict)
    # raced-out candidates that completing the front stopped as clearly off it (one dict each; run.json)
    front_closed: list[dict] = field(default_factory=list)

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
        from .model_files import model_fingerprint

        info = self.pool.info[0]
        dtype = self.cfg.model.dtype  # auto resolved to bf16 (GPUs) is a context of its own; auto = fp32 as before
        if dtype == "auto" and info.get("dtype", "float32") != "float32":
            dtype = f"auto:{info['dtype']}"
        desc = {"model": model_fingerprint(self.cfg.model.name), "units": info["units"], "dtype": dtype,
                "eval": describe(self.devset, directions), "metric": self.cfg.metric.primary,
                "signatures": info["signatures"], "decoding": self.cfg.decoding.__dict__.copy()}
        if self.racing and not self.pool.exact_rows:
            # racing decodes in blocks (EvalSettings.block): a context of its own, unless rows are exact (the
            # actors' greedy loop decodes every sentence of a block as the plain decoding does)
            desc["decoding"]["block"] = self.cfg.search.racing_chunk
        if info.get("dispatch"):
            desc["moe_dispatch"] = info["dispatch"]
        es = EvalSet(list(directions), desc, METRICS[self.cfg.metric.primary])
        if limit is not None and limit < len(self.devset):
            es.limit = limit
            desc["first_sentences"] = limit
        if metric is not None and metric != self.cfg.metric.primary:
            es.metric = METRICS[metric]
            desc.update(proxy=metric, metric=metric, proxy_signature=es.metric.fixed_signature)
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
            for cand, res in self._decode(mine, es):
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

    def _decode(self, candidates: list[Candidate], es: EvalSet) -> Iterator[tuple[Candidate, dict]]:
        """``(candidate, result)`` of full evaluations on the pool as they finish (:meth:`EvaluatorPool.evaluate`),
        except that fewer candidates than actors (the baseline, a held-out check) are cut by sentences, where rows are
        exact and the metric is decoded: a piece per actor with every direction (prompts and batches shared across
        directions, the candidates in lockstep where the actors decode so), the pieces balanced by their sentences'
        lengths, and each candidate scored from its hypotheses as a race's survivor is (:meth:`_full_result`); the
        pool would give each actor whole directions instead."""
        if not (self.pool.exact_rows and METRICS[es.metric.name].decoded) or len(candidates) >= self.pool.size:
            yield from self.pool.evaluate(((c, es.directions) for c in candidates), es.limit, es.metric.name)
            return
        n = es.limit or len(self.devset)
        names = [tuple(d) for d in es.directions]
        hyps, stats, cost = _nothing_decoded(candidates, names)
        for c, part in self._race_chunks([(c, c.units, names, 0, n) for c in candidates], n):
            _add_part(part, hyps[c], cost[c], stats[c])
        for c in candidates:
            yield c, self._full_result(hyps[c], stats[c], cost[c], es, names)

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

    def evaluate_staged(self, candidates: list[Candidate], strategy: str, es: EvalSet, *,
                        floor: float | None = None, keep: int = 1) -> list[Evaluation]:
        """Score a batch through the stages of ``search.fidelity`` (see :class:`FidelityConfig`): each
        stage scores what the previous one kept and passes on its best ``keep`` fraction; a candidate
        dropped at a stage keeps that stage's evaluation. A proxy's ranked score (negated KL) is below
        any BLEU, so a dropped candidate ranks under the decoded ones. No stage on: :meth:`evaluate`.
        With ``search.racing`` a greedy or beam batch is raced instead (:meth:`evaluate_raced`, ``floor`` and ``keep``)."""
        if self.racing and strategy in RACED:  # stepwise strategies only (compare runs others too)
            return self.evaluate_raced(candidates, strategy, es, floor=floor, keep=keep)
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

    def evaluate_raced(self, candidates: list[Candidate], strategy: str, es: EvalSet, *,
                       floor: float | None = None, keep: int = 1) -> list[Evaluation]:
        """Race one step's candidates (:mod:`cullmt_ray.racing`): decode them chunk by chunk (one
        block of ``EvalSettings.block`` sentences per direction at a time, decoded exactly as a full
        evaluation decodes it), let a paired bootstrap drop those clearly below the ``keep``-th best or
        below ``floor`` (the acceptance line), and let the survivors run to the end of the dev set:
        their hypotheses, scored with every metric as the actors score them, are their full evaluation
        (stored in ``es``'s context, as without racing). From the second round on, an actor that a round leaves
        idle (its tasks taken, other actors' still running) decodes the next chunk of one of the last round's leaders
        meanwhile (``FILLERS``), which the next round then skips. A dropped candidate is stored in the race's
        own context with its score on the sentences it saw and comes back ``partial`` (it ranks below
        every full score). Candidates already in the store are not recomputed where a resumed step
        has them all, and one an earlier race dropped is not raced again. The race claims its candidates as
        :meth:`evaluate` does: one another run is racing is not raced here but waited for (its full or raced-out
        evaluation, see :meth:`_await_raced`), and a raced-out candidate's claim is given back."""
        import numpy as np

        from .racing import corpus_score, next_stop, race_round

        sc = self.cfg.search
        race = self._race_context(es)
        todo = list(dict.fromkeys(candidates))
        full_hit = {c: self.store.get(es.context, c) for c in todo}
        race_hit = {c: self.store.get(race.context, c) for c in todo}
        if len(todo) <= keep or all(full_hit[c] or race_hit[c] for c in todo):  # nothing to race, or a resumed step
            full = [c for c in todo if full_hit[c] or not race_hit[c]]
            done = dict(zip(full, self.evaluate(full, strategy, es)))
            return [done.get(c) or dataclasses.replace(race_hit[c], partial=True) for c in candidates]
        others = []  # claimed by another run: waited for after the race
        for c in todo:
            if not full_hit[c] and not race_hit[c]:
                state = self.store.claim(es.context, c, self.owner)
                if state == "stored":
                    full_hit[c] = self.store.get(es.context, c)
                elif state == "taken":
                    others.append(c)
        if self._keeper is None:
            self._keeper = self.store.keep_claims(self.owner)
        known = [c for c in todo if race_hit[c] and not full_hit[c]]  # raced out by an earlier race: not raced again
        if others or known:
            if others:
                log.info("%s: %d candidate(s) of this step are being raced by another run; racing the other %d",
                         strategy, len(others), len(todo) - len(others) - len(known))
            racers = [c for c in todo if c not in others and c not in known]
            raced = self.evaluate_raced(racers, strategy, es, floor=floor, keep=keep) if racers else []
            done = dict(zip(racers, raced)) | self._await_raced(others, strategy, es)
            done |= {c: dataclasses.replace(race_hit[c], partial=True) for c in known}
            return [done[c] for c in candidates]
        n = es.limit or len(self.devset)
        names = [tuple(d) for d in es.directions]
        sacre = _sacre(es)
        hyps, stats, cost = _nothing_decoded(todo, names)
        alive, left, seen, rnd = list(todo), {}, 0, 0
        ahead: dict[Candidate, tuple[int, int]] = {}  # a leader's next chunk run ahead by an idle actor (FILLERS)
        fillers = {"used": 0, "dropped": 0, "dropped_sentences": 0}
        scores: dict[Candidate, float] = {}  # the last round's (none before the first: no fillers in it)
        t0 = time.perf_counter()
        while seen < n:  # the survivors go on to the end: their race decoding is their full evaluation
            # once the race is decided (no more than ``keep`` left), the rest of the dev set in one go
            stop = next_stop(seen, n, sc.racing_chunk) if len(alive) > keep else n
            chunks = [(c, c.units, names, ahead[c][1] if c in ahead else seen, stop) for c in alive]
            fill = [] if len(alive) <= keep or stop == n else \
                [(c, c.units, names, stop, next_stop(stop, n, sc.racing_chunk))
                 for c in sorted(scores, key=lambda c: -scores[c]) if c in alive][:FILLERS]
            parts = self._race_chunks([ch for ch in chunks if ch[3] < ch[4]], n, fill)
            parts += [(c, {**self.pool.filled((c, s)), "start": s}) for c, (s, _) in ahead.items()]
            fillers["used"] += len(ahead)
            for c, part in sorted(parts, key=lambda cp: cp[1]["start"]):
                _add_part(part, hyps[c], cost[c], stats[c])
            ahead = {c: (s, e) for c, _, _, s, e in fill if self.pool.holds((c, s))}
            seen, rnd = stop, rnd + 1
            if len(alive) > keep and seen < n:
                res = race_round({c: {d: np.asarray(stats[c][d]) for d in names} for c in alive}, names,
                                 es.metric.name, keep=keep, floor=floor, confidence=sc.racing_confidence,
                                 seed=rnd, sacre=sacre, total=n)
                for c, why in res.out.items():
                    left[c] = _Left(res.scores[c], seen, why, res.upper[c], *res.margin[c])
                    self._close_on_loss(es, c, left[c], cost)
                    if c in ahead:  # run ahead for nothing: its sentences count as generated all the same
                        s, e = ahead.pop(c)
                        self.pool.drop((c, s))
                        fillers["dropped"] += 1
                        fillers["dropped_sentences"] += (e - s) * len(names)
                alive = [c for c in alive if c not in res.out]
                scores = res.scores
        out: dict[Candidate, Evaluation] = {}
        m = es.metric
        for c in alive:  # full evaluations: every sentence decoded in the race, scored as the actors do
            if full_hit[c]:
                self.budget.cached += 1
                out[c] = full_hit[c]
                continue
            out[c] = self.record(c, self._full_result(hyps[c], stats[c], cost[c], es, names), es, strategy)
            self._keep(self._stats, (es.context, c), stats[c])

        def bound(c: Candidate) -> float:
            """An upper bound of ``c``'s full score: the full score of the one it lost to (or that one's bound)
            plus their paired margin, or its own bootstrap bound if lower."""
            ref = left[c].lost_to
            base = out[ref].score if ref in out and not out[ref].partial else bound(ref) if ref in left else math.inf
            return min(left[c].upper, base + left[c].margin)

        for c, lc in left.items():
            if full_hit[c]:
                out[c] = full_hit[c]  # a full score from an earlier run beats a partial one
                continue
            k = cost[c]
            per_dir = {"-".join(d): m.rounded(float(corpus_score(m.name, np.asarray(stats[c][d]).sum(axis=0), sacre)))
                       for d in names}
            res = {"score": m.ranked(m.rounded(lc.score)), "params": k["params"], "bytes": k["bytes"],
                   "metrics": {m.name: {**dict(sorted(per_dir.items())), "mean": m.rounded(lc.score),
                                        "upper": m.rounded(bound(c))}},
                   "sentences": k["sentences"], "seconds": k["seconds"], "actor": ",".join(sorted(k["actors"]))}
            ev = race_hit[c] or self.record(c, res, race, f"{strategy}:race")
            out[c] = dataclasses.replace(ev, partial=True)
            self.store.release(es.context, c, self.owner)
            if not race_hit[c]:  # what it decoded, should the front need its full score (complete_front)
                self._keep(self._raced, (es.context, c), _Decoded(lc.seen, hyps[c], cost[c], stats[c]))
        self.budget.requested += len(candidates) * n * len(names)
        self.budget.sentences += fillers["dropped_sentences"]
        self.race_log.append({"candidates": len(todo), "rounds": rnd, "survivors": [c.units for c in alive],
                              "decoded_sentences": sum(k["sentences"] for k in cost.values()) + fillers["dropped_sentences"],
                              "plain_sentences": len(todo) * n * len(names), "seconds": round(time.perf_counter() - t0, 2),
                              "fillers": fillers,
                              "out": {"+".join(c.units): {"seen": lc.seen, "why": lc.why, "score": round(lc.score, 4),
                                                          "upper": out[c].metrics[m.name].get("upper")}
                                      for c, lc in left.items()}})
        return [out[c] for c in candidates]

    def _close_on_loss(self, es: EvalSet, c: Candidate, lc: _Left, cost: dict) -> None:
        """A candidate that left a race as worse than one no larger than it is off the Pareto front by the test that
        decided the step: below that one, which is itself below (or is) a full evaluation of at most its size once
        the front is complete (:meth:`complete_front`); recorded in ``front_closed``, never decoded again."""
        from .racing import WORSE

        ref = lc.lost_to
        if lc.why != WORSE or cost[ref]["params"] > cost[c]["params"]:  # both decoded the race's rounds
            return
        self.front_closed.append({"context": es.context, "removed": c.units, "seen": lc.seen,
                                  "score": es.metric.rounded(lc.score), "below": ref.units, "by": "race"})

    def _await_raced(self, candidates: list[Candidate], strategy: str, es: EvalSet) -> dict[Candidate, Evaluation]:
        """Wait for candidates another run is racing: its full evaluation, or its raced-out (partial) one; a
        candidate whose claim lapses with neither (that run died) is evaluated here in full."""
        race = self._race_context(es)
        out: dict[Candidate, Evaluation] = {}
        waiting = list(candidates)
        while waiting:
            still, mine = [], []
            for c in waiting:
                state = self.store.claim(es.context, c, self.owner)
                if (partial := self.store.get(race.context, c)) is not None and state != "stored":
                    if state == "mine":
                        self.store.release(es.context, c, self.owner)
                    out[c] = dataclasses.replace(partial, partial=True)
                elif state == "stored":
                    out[c] = self.store.get(es.context, c)
                    self.budget.cached += 1
                elif state == "mine":
                    mine.append(c)
                else:
                    still.append(c)
            out.update(zip(mine, self.evaluate(mine, strategy, es)))
            if still:
                time.sleep(self.poll_seconds)
            waiting = still
        return out

    def complete_front(self, es: EvalSet, strategy: str) -> list[Evaluation]:
        """Score in full the raced-out candidates of ``es`` that could be on its Pareto front (not closed when they
        left their race, :meth:`_close_on_loss`, and no full evaluation of at most their size reaches their upper
        bound, see :meth:`evaluate_raced`; none stored: no bound), until none is left: the front of a raced search
        is then plain greedy's wherever the races decided as plain greedy does. Those that left a race of this run race
        on from the sentences they saw (:meth:`_race_to_front`) and stop once clearly off the front; the others
        (a resumed run's) are scored in full. The highest bounds go first, one per actor at a time, so that the
        full scores they reach rule out the rest by their bounds alone (where the actors decode in lockstep, all at once:
        a round of several costs little more than one). Returns the evaluations it computed."""
        race = self._race_context(es)
        m = es.metric.name
        done: list[Evaluation] = []
        while True:
            full = list(self.store.evaluations(es.context))
            have = {e.candidate for e in full}
            closed = {Candidate.of(c["removed"]) for c in self.front_closed if c["context"] == es.context}
            bounds = [(p.metrics[m].get("upper", math.inf), p) for p in self.store.evaluations(race.context)
                      if p.candidate not in have and p.candidate not in closed]
            open_ = sorted(((u, p) for u, p in bounds if not any(e.params <= p.params and e.score >= u for e in full)),
                           key=lambda up: -up[0])
            if not open_:
                return done
            # actors that decode in lockstep race them all at once: a round of several costs little more than one
            todo = [p for _, p in (open_ if getattr(self.pool, "lockstep", False) else open_[: self.pool.size])]
            log.info("racing: completing %s (could be on the Pareto front)", "; ".join("+".join(p.candidate.units) for p in todo))
            kept = [p for p in todo if (es.context, p.candidate) in self._raced]
            done += self._race_to_front(kept, full, f"{strategy}:front", es) if kept else []
            done += self.evaluate([p.candidate for p in todo if p not in kept], f"{strategy}:front", es)

    def _race_to_front(self, partials: list[Evaluation], full: list[Evaluation], strategy: str,
                       es: EvalSet) -> list[Evaluation]:
        """Race raced-out candidates of this run on from the sentences they saw, chunk by chunk as a step races
        (:func:`cullmt_ray.racing.next_stop`), against the front: after each chunk a candidate stops once a paired
        bootstrap on the sentences seen (:func:`cullmt_ray.racing.off_front`, ``search.racing_confidence``) puts it
        below another one of at most its size (racing on with it, or a full evaluation this run raced) or below
        the best full score of at most its size; it is then off the front (``front_closed``). The rest reach the
        end of the dev set: their full evaluations, stored and returned."""
        import numpy as np

        from .racing import corpus_score, next_stop, off_front

        n = es.limit or len(self.devset)
        names = [tuple(d) for d in es.directions]
        sacre, sc, m = _sacre(es), self.cfg.search, es.metric
        kept: dict[Candidate, _Decoded] = {p.candidate: self._raced.pop((es.context, p.candidate)) for p in partials}
        params = {e.candidate: e.params for e in [*full, *partials]}
        refs = {e.candidate: self._stats[es.context, e.candidate] for e in full if (es.context, e.candidate) in self._stats}
        seen = {c: k.seen for c, k in kept.items()}
        counted = {c: k.cost["sentences"] for c, k in kept.items()}  # counted when its partial evaluation was stored
        # the best full score of at most each candidate's size: the line it must beat
        lines = {c: max((e.score for e in full if e.params <= params[c]), default=None) for c in kept}
        alive, rnd, stop = list(kept), 0, min(seen.values(), default=0)
        while alive:
            # off the front on the sentences every one of them has seen (before any decoding: what they saw in
            # their races), then on to the next chunk
            now = {c: kept[c].stats for c in alive} | refs
            for c in list(alive) if stop else []:
                rivals = [r for r in now if r != c and params[r] <= params[c]]
                sub = {x: {d: np.asarray(now[x][d][:stop]) for d in names} for x in [c, *rivals]}
                below = off_front(sub, names, m.name, lines[c], sc.racing_confidence, seed=1000 + rnd, sacre=sacre,
                                  total=n)
                if below is None:
                    continue
                alive.remove(c)
                score = float(np.mean([float(corpus_score(m.name, sub[c][d].sum(axis=0), sacre)) for d in names]))
                what = below.units if isinstance(below, Candidate) else m.rounded(below)
                self.front_closed.append({"context": es.context, "removed": c.units, "seen": stop,
                                          "score": m.rounded(score), "below": what, "by": "front"})
                self.budget.sentences += kept[c].cost["sentences"] - counted[c]
                log.info("racing: %s is off the Pareto front after %d sentences per direction (below %s)",
                         "+".join(c.units), stop, "+".join(what) if isinstance(what, list) else what)
            if not alive:
                break
            top = max(seen[c] for c in alive)
            stop = top if any(seen[c] < top for c in alive) else next_stop(top, n, sc.racing_chunk)
            for c, part in self._race_chunks([(c, c.units, names, seen[c], stop) for c in alive if seen[c] < stop], n):
                _add_part(part, kept[c].hyps, kept[c].cost, kept[c].stats)
            seen.update({c: stop for c in alive})
            if stop >= n:
                break
            rnd += 1
        out = []
        for c in alive:
            out.append(self.record(c, self._full_result(kept[c].hyps, kept[c].stats, kept[c].cost, es, names), es, strategy))
            self.budget.sentences -= counted[c]
            self._keep(self._stats, (es.context, c), kept[c].stats)
        return out

    def _race_chunks(self, chunks: list[tuple], n: int, fillers: list[tuple] = ()) -> list[tuple[Candidate, dict]]:
        """Decode racing chunks ``(candidate, removed, directions, start, stop)`` of a race over ``n`` sentences,
        cut for the actors (:meth:`EvaluatorPool.race_tasks`): ``(candidate, part)`` for each piece, in sentence
        order (a candidate's pieces then extend its hypotheses and statistics in order). ``fillers``: chunks an
        actor left idle by the others runs meanwhile, not waited for (:meth:`EvaluatorPool.sentence_stats`)."""
        parts = list(self.pool.sentence_stats(self.pool.race_tasks(chunks), n, fillers))
        return sorted(parts, key=lambda cp: cp[1]["start"])

    @staticmethod
    def _keep(kept: dict, key, value) -> None:
        """``kept[key] = value``, bounded: beyond ``RACED_KEPT`` entries the oldest go (decoded anew if needed)."""
        kept[key] = value
        while len(kept) > RACED_KEPT:
            kept.pop(next(iter(kept)))

    def _full_result(self, hyps: dict, stats: dict, cost: dict, es: EvalSet, names: list) -> dict:
        """A race survivor's full evaluation from its hypotheses and the primary metric's sentence statistics (per
        direction), in the shape of a merged pool result: every metric scored as the actors score it (the primary
        from its summed statistics, the others with the references' n-grams extracted once per direction)."""
        from .metrics import Scorer

        if self._scorer is None:
            self._scorer = Scorer(spm=self.cfg.metric.spm_for(self.cfg.model.name), metrics=tuple(self.cfg.metric.scored))
        n = es.limit or len(self.devset)
        metrics: dict[str, dict[str, float]] = {}
        for d in sorted(names, key="-".join):
            scores = self._scorer.score(hyps[d], list(self.devset.lines[d[1]][:n]), key=(d, n),
                                        stats={es.metric.name: stats[d]})
            for name, v in scores.items():
                metrics.setdefault(name, {})["-".join(d)] = v
        for name, per in metrics.items():
            metrics[name] = {**dict(sorted(per.items())), "mean": METRICS[name].rounded(sum(per.values()) / len(per))}
        return {"score": METRICS[es.metric.name].ranked(metrics[es.metric.name]["mean"]), "metrics": metrics,
                "params": cost["params"], "bytes": cost["bytes"], "sentences": cost["sentences"],
                "seconds": cost["seconds"], "actor": ",".join(sorted(cost["actors"]))}

    def _race_context(self, es: EvalSet) -> EvalSet:
        key = f"race|{es.context}"
        if key not in self._stages:
            sc = self.cfg.search
            # the bootstrap's question (full scores: predictive) is part of what a raced-out score and bound mean
            desc = {**es.description, "raced": {"chunk": sc.racing_chunk, "confidence": sc.racing_confidence,
                                                "bootstrap": "predictive"}}
            self._stages[key] = EvalSet(list(es.directions), desc, es.metric, self.store.register_context(desc), es.limit)
        return self._stages[key]

