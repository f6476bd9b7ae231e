"""``cullmt-ray search``: a session, a strategy loop, held-out scores, the run folder's files.

A run folder (``results/runs/<name>-<time>``) holds the resolved config, ``run.json`` (status,
baseline, signatures, budget spent), the strategy trace, held-out scores and the Pareto files.
Every evaluation goes to the store the moment it finishes; ``--resume RUN_DIR`` replays the
strategy, reading every evaluation it already has from the store instead of recomputing it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .atomic import write_json
from .candidate import BASELINE, Candidate, Evaluation
from .config import SearchRunConfig
from .data import direction_name
from .pareto import export_context
from .report import write_report
from .session import Session, open_session
from .strategies import make_strategy

log = logging.getLogger("cullmt_ray")


def run_search(cfg: SearchRunConfig, run_dir: Path | None = None, accept_config_changes: bool = False) -> Path:
    """Run (or resume, when ``run_dir`` has a config) the configured search; return the run folder."""
    t0 = time.time()
    with open_session(cfg, "search", run_dir, accept_config_changes=accept_config_changes) as session:
        (baseline,) = session.evaluate([BASELINE], "baseline")
        log.info("baseline %s = %.2f, %.2fM params", cfg.metric.primary, baseline.score, baseline.params / 1e6)
        strategy = make_strategy(cfg.search, session.units, baseline, batch=session.batch)
        session.keep_study(strategy)
        if cfg.search.seed_from_store:
            strategy.seed_with([e for e in session.store.evaluations(session.calibration.context) if e.candidate])
        front_completed: list = []
        if cfg.search.driver == "tune":
            from .tune_driver import run_with_tune

            run_with_tune(strategy, session, cfg.resources.trial_cpus, session.run_dir / "tune")
        else:
            race = {"floor": baseline.score - cfg.search.threshold, "keep": getattr(strategy, "width", 1)}
            while batch := strategy.ask():
                strategy.tell(session.service.evaluate_staged(batch, strategy.name, session.calibration, **race))
                write_json(session.run_dir / "trace.json", strategy.trace())
            if session.service.racing:  # raced-out candidates that may be front points, scored in full
                front_completed = session.service.complete_front(session.calibration, strategy.name)
        trace = strategy.trace()
        write_json(session.run_dir / "trace.json", trace)
        heldout = score_heldout(session, trace)
        if heldout:
            write_json(session.run_dir / "heldout.json", heldout)
        title = f"{cfg.model.name} on {cfg.data.dev}"
        files = export_context(session.store, session.calibration.context, session.run_dir, title, trace,
                               cfg.search.threshold)
        session.finish(wall_seconds=round(time.time() - t0, 2),
                       baseline={"score": baseline.score, "params": baseline.params, "bytes": baseline.bytes},
                       final={"removed": trace.get("final", []), "stop_reason": trace.get("stop_reason", "")},
                       files={**{k: str(v.relative_to(session.run_dir)) for k, v in files.items()},
                              "report": "report.html", "sensitivity": "sensitivity.csv"},
                       **({"racing": session.service.race_log,
                            "racing_front_completed": [e.candidate.units for e in front_completed],
                            "racing_front_closed": [{k: v for k, v in c.items() if k != "context"}
                                                    for c in session.service.front_closed]}
                          if session.service.racing else {}))
        write_report(session.run_dir, session.store, title)
        b = session.service.budget
        log.info("finished: removed %s (%s); %d evaluations computed, %d read from the store",
                 trace.get("final", []), trace.get("stop_reason", ""), b.evaluated, b.cached)
        log.info("Pareto front: %s and %s; report: %s", session.run_dir / "pareto.csv", session.run_dir / "pareto.png",
                 session.run_dir / "report.html")
        return session.run_dir


def score_heldout(session: Session, trace: dict) -> dict | None:
    """Score the baseline and the final prune set on the directions the search did not see."""
    if session.heldout is None:
        return None
    final = Candidate.of(trace.get("final", []))
    base_h, final_h = session.evaluate([BASELINE, final], "heldout", session.heldout)
    return {"directions": [direction_name(d) for d in session.heldout.directions],
            "baseline": _scores(base_h), "final": {"removed": final.units, **_scores(final_h),
                                                   "drop": round(base_h.score - final_h.score, 4)}}


def _scores(ev: Evaluation) -> dict:
    return {"score": ev.score, "metrics": ev.metrics}
