"""Run any strategy under Ray Tune: the strategy becomes a Tune ``Searcher``, each candidate a trial.

Trials are light (``resources.trial_cpus``, 0.05 CPU by default): a trial sends its candidate's
directions to the evaluator actors, which hold the models, merges the parts and reports the
score. So Tune's trial table, its experiment folder and the dashboard show the search as it
goes, while the actors never starve the trials (they leave ``resources.reserve_cpus`` free).

The searcher keeps the strategy's ask/tell contract: it hands out one asked batch as trials,
waits until every trial of the batch is complete, then tells the strategy. Candidates the store
already knows never become trials; every new result goes to the store as it completes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.search import Searcher

from .candidate import Candidate, Evaluation
from .evaluation import EvalSet, EvaluationService
from .evaluator import merge_results
from .strategies import BaseStrategy


def evaluate_trial(config: dict, actors: list, directions: list, metric: str) -> None:
    """Tune trainable: score one prune set on the evaluator actors, one task per direction."""
    removed = list(config["removed"])
    start = hash(tuple(removed)) % len(actors)
    refs = [actors[(start + i) % len(actors)].evaluate.remote(removed, [d]) for i, d in enumerate(directions)]
    res = merge_results(ray.get(refs), metric)
    tune.report({"score": res["score"], "params": res["params"], "bytes": res["bytes"], "n_removed": len(removed),
                 "sentences": res["sentences"], "seconds": res["seconds"], "metrics_json": json.dumps(res["metrics"]),
                 "actor": res["actor"]})


class StrategySearcher(Searcher):
    """A :class:`BaseStrategy` as a Ray Tune searcher; lookups and results go through the evaluation service."""

    def __init__(self, strategy: BaseStrategy, service: EvaluationService, es: EvalSet):
        super().__init__(metric="score", mode="max")
        self.strategy, self.service, self.es = strategy, service, es
        self.batch: list[Candidate] = []
        self.queue: list[Candidate] = []
        self.running: dict[str, Candidate] = {}
        self.waiting: list[Candidate] = []  # neither stored nor claimed by us yet (another run may compute them)
        self.results: dict[Candidate, Evaluation] = {}
        self.finished = False
        self.error = ""

    def _next_batch(self) -> None:
        """Tell the finished batch, ask the next; store hits are resolved without trials."""
        while not self.queue and not self.running and not self.finished:
            if self.waiting:  # read what another run stored, claim what it left; trials for ours only
                mine, self.waiting = self.service.claim_or_read(self.waiting, self.es, self.strategy.name,
                                                                self.results)
                self.queue += mine
                if self.waiting and not mine:
                    time.sleep(self.service.poll_seconds)
                return
            if self.batch:
                self.strategy.tell([self.results[c] for c in self.batch])
            self.batch = self.strategy.ask()
            if not self.batch:
                self.finished = True
                return
            self.waiting = list(dict.fromkeys(self.batch))

    def __getstate__(self) -> dict:
        # Tune pickles its searcher into the experiment folder; the service (store, pool) and the
        # strategy (an Optuna study, say) stay out: a killed run resumes from the store instead.
        return {k: v for k, v in self.__dict__.items() if k not in ("service", "strategy")}

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the store holds every result, and a resumed run replays the strategy from it."""
        Path(checkpoint_path).write_text("{}")

    def restore(self, checkpoint_path: str) -> None:
        pass

    def suggest(self, trial_id: str) -> dict | None:
        if self.error:
            return Searcher.FINISHED
        self._next_batch()
        if self.finished:
            return Searcher.FINISHED
        if not self.queue:
            return None  # the rest of the batch is still running
        c = self.queue.pop(0)
        self.running[trial_id] = c
        return {"removed": c.units}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        c = self.running.pop(trial_id, None)
        if c is None:
            return
        if error or not result or "score" not in result:
            self.error = f"the Tune trial for {c} failed; its error is in the Tune experiment folder"
            return
        res = {k: result[k] for k in ("score", "params", "bytes", "sentences", "seconds")}
        res.update(metrics=json.loads(result["metrics_json"]), actor=result.get("actor"))
        self.results[c] = self.service.record(c, res, self.es, self.strategy.name)


def run_with_tune(strategy: BaseStrategy, session, trial_cpus: float, storage: Path) -> StrategySearcher:
    """Drive ``strategy`` through ``tune.Tuner``; returns the searcher (finished strategy, results)."""
    es = session.calibration
    searcher = StrategySearcher(strategy, session.service, es)
    trainable = tune.with_resources(
        tune.with_parameters(evaluate_trial, actors=session.pool.actors, directions=es.directions,
                             metric=es.metric.name),
        {"cpu": trial_cpus})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                    max_concurrent_trials=max(1, 2 * session.pool.size), reuse_actors=True),
        run_config=tune.RunConfig(name=session.run_id, storage_path=str(storage.resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2)))
    tuner.fit()
    if searcher.error:
        raise RuntimeError(searcher.error)
    if not searcher.finished:  # Tune stopped before the strategy did (it should not)
        searcher._next_batch()
    return searcher
