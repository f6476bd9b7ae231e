"""Custom Ray metrics of a search, exported by each node's metrics agent (Prometheus format).

Recorded in the driver (the local loop and the Ray Tune searcher), tagged by ``run`` and
``strategy`` (``greedy``, ``greedy:low``, ``baseline``, ``heldout``...). Ray prefixes every name
with ``ray_``, and a Counter also appears with a ``_total`` suffix:

==================================  =========  ==============================================
metric                              type       what
==================================  =========  ==============================================
``cullmt_candidates_evaluated``     Counter    candidates scored by the actors (not from the store)
``cullmt_store_hits``               Counter    candidates read from the results store instead
``cullmt_evaluation_seconds``       Histogram  actor-seconds per candidate (all its directions)
``cullmt_sentences_per_second``     Gauge      sentences translated per actor-second, last candidate
``cullmt_best_score``               Gauge      best primary-metric score of a pruned candidate so far
``cullmt_baseline_score``           Gauge      score of the unpruned model
==================================  =========  ==============================================

Metrics never stop a search: if recording fails (no Ray, an old Ray), it is switched off.
docs/monitoring.md shows where to see them (dashboard, Prometheus, Grafana).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

TAGS = ("run", "strategy")
SECONDS_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]

_metrics: dict | None = None
_disabled = False
_best: dict[tuple[str, str], float] = {}


def _get() -> dict | None:
    global _metrics, _disabled
    if _disabled:
        return None
    if _metrics is None:
        try:
            from ray.util.metrics import Counter, Gauge, Histogram

            _metrics = {
                "evaluated": Counter("cullmt_candidates_evaluated", "Candidates scored by the evaluator actors",
                                     tag_keys=TAGS),
                "hits": Counter("cullmt_store_hits", "Candidates read from the results store instead of scored",
                                tag_keys=TAGS),
                "seconds": Histogram("cullmt_evaluation_seconds", "Actor-seconds per candidate (all directions)",
                                     boundaries=SECONDS_BUCKETS, tag_keys=TAGS),
                "sps": Gauge("cullmt_sentences_per_second", "Sentences translated per actor-second (last candidate)",
                             tag_keys=TAGS),
                "best": Gauge("cullmt_best_score", "Best primary-metric score of a pruned candidate so far",
                              tag_keys=TAGS),
                "baseline": Gauge("cullmt_baseline_score", "Primary-metric score of the unpruned model",
                                  tag_keys=TAGS),
            }
        except Exception as e:  # noqa: BLE001 - metrics are an extra: never fail a search for them
            _disabled = True
            log.warning("cullmt-ray metrics are off: %s", e)
            return None
    return _metrics


def _record(fn) -> None:
    global _disabled
    m = _get()
    if m is None:
        return
    try:
        fn(m)
    except Exception as e:  # noqa: BLE001 - as above
        _disabled = True
        log.warning("cullmt-ray metrics are off: %s", e)


def _best_score(m: dict, ev, tags: dict) -> None:
    if not ev.candidate.removed:
        m["baseline"].set(float(ev.score), tags)
        return
    key = (tags["run"], tags["strategy"])
    if key not in _best or ev.score > _best[key]:
        _best[key] = float(ev.score)
        m["best"].set(_best[key], tags)


def evaluated(ev) -> None:
    """One candidate scored by the actors (an :class:`~cullmt_ray.store.Evaluation` of this run)."""
    tags = {"run": str(ev.run), "strategy": str(ev.strategy)}

    def rec(m: dict) -> None:
        m["evaluated"].inc(1, tags)
        m["seconds"].observe(float(ev.seconds), tags)
        if ev.seconds > 0 and ev.sentences:
            m["sps"].set(ev.sentences / ev.seconds, tags)
        _best_score(m, ev, tags)

    _record(rec)


def store_hit(run: str, strategy: str, ev) -> None:
    """A candidate of ``run``/``strategy`` read from the results store instead of scored."""
    tags = {"run": str(run), "strategy": str(strategy)}

    def rec(m: dict) -> None:
        m["hits"].inc(1, tags)
        _best_score(m, ev, tags)

    _record(rec)
