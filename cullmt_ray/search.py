"""The search driver: config -> dev set -> evaluator pool -> strategy loop -> store -> run folder.

A run folder (``results/runs/<name>-<time>``) holds the resolved config, ``run.json`` (status,
baseline, signatures, budget spent), the strategy trace, held-out scores and the Pareto files.
Every evaluation goes to the store the moment it finishes; ``--resume RUN_DIR`` replays the
strategy, reading every evaluation it already has from the store instead of recomputing it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import ray
import yaml
from tqdm import tqdm

from . import monitoring
from .atomic import write_json, write_text
from .candidate import BASELINE, Candidate
from .config import SearchRunConfig, from_dict, validate
from .data import (
    DevSet,
    Direction,
    describe,
    direction_name,
    load_devset,
    parse_directions,
)
from .evaluator import EvalSettings, EvaluatorPool, Resources
from .families import Decoding, ModelSpec, model_fingerprint
from .families.base import FamilyError
from .pareto import export_front
from .store import Evaluation, ResultStore
from .strategies import STRATEGIES, BaseStrategy, SearchSpace, StopRule


class SearchError(RuntimeError):
    """A search that cannot start or go on; one line saying why."""


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (auto, ray://, or a head's GCS) or start a local cluster.

    Inside a Ray job (``cullmt-ray submit``) ``RAY_ADDRESS`` names the job's cluster: joined, never a new one.
    """
    if ray.is_initialized():
        return
    if address and address.startswith(("http://", "https://")):
        raise SearchError(f"resources.address={address!r} is a dashboard address: run the command there with "
                          f"cullmt-ray submit --address {address} -- COMMAND, or give auto, ray://HOST:10001 or HOST:6379")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, **kw)


@dataclass
class EvalSet:
    """One evaluation context: the directions scored and the store key of the whole setting."""

    directions: list[Direction]
    description: dict
    context: str = ""
    limit: int | None = None  # only the first ``limit`` sentences per direction (a low-fidelity stage)
    proxy: str | None = None  # a proxy score instead of decoding (kl)


@dataclass
class Session:
    """What a search needs at hand: pool, store, contexts, and the budget it has spent."""

    cfg: SearchRunConfig
    run_id: str
    pool: EvaluatorPool
    store: ResultStore
    calibration: EvalSet
    heldout: EvalSet | None
    devset: DevSet | None = None
    evaluated: int = 0  # full evaluations computed in this run
    cached: int = 0  # evaluations read from the store instead
    sentences: int = 0  # sentences generated in this run
    requested: int = 0  # sentences of every evaluation asked for, computed or read (full-evaluation equivalents)
    _stages: dict[str, EvalSet] = field(default_factory=dict)  # low-fidelity contexts, made on first use

    def evalset(self, directions: list[Direction], limit: int | None = None, proxy: str | None = None) -> EvalSet:
        """An evaluation context over other directions, fewer sentences, or a proxy of the same dev set."""
        info = self.pool.info[0]
        es = _evalset(self.cfg, self.devset, directions, info["signatures"], self.cfg.model.name, info["units"],
                      info.get("dispatch"))
        if limit is not None and limit < len(self.devset):
            es.limit = limit
            es.description = {**es.description, "first_sentences": limit}
        if proxy:
            es.proxy = proxy
            es.description = {**es.description, "proxy": proxy, "metric": proxy}
        es.context = self.store.register_context(es.description)
        return es

    def evaluate_staged(self, candidates: list[Candidate], strategy: str) -> list[Evaluation]:
        """Score a batch through the stages of ``search.fidelity`` (see :class:`FidelityConfig`): each
        stage scores what the previous one kept and passes on its best ``keep`` fraction; a candidate
        dropped at a stage keeps that stage's evaluation. Proxy scores are negated KL (below any BLEU),
        so a dropped candidate always ranks under the decoded ones. No stage on: plain :meth:`evaluate`.
        """
        fid = self.cfg.search.fidelity
        stages = []
        if fid.proxy:
            stages.append(("proxy", lambda: self.evalset(self.calibration.directions, proxy=fid.proxy)))
        if fid.sentences is not None:
            stages.append(("low", lambda: self.evalset(self.calibration.directions, fid.sentences)))
        result: dict[Candidate, Evaluation] = {}
        todo = list(dict.fromkeys(candidates))
        for name, make in stages:
            if len(todo) < 2:
                break
            if name not in self._stages:
                self._stages[name] = make()
            scored = self.evaluate(todo, f"{strategy}:{name}", self._stages[name])
            result.update(zip(todo, scored))
            keep = max(1, math.ceil(fid.keep * len(todo)))
            todo = [e.candidate for e in sorted(scored, key=lambda e: (-e.score, e.params))[:keep]]
        result.update(zip(todo, self.evaluate(todo, strategy)))
        return [result[c] for c in candidates]

    def evaluate(self, candidates: list[Candidate], strategy: str, evalset: EvalSet | None = None) -> list[Evaluation]:
        """Scores in input order: from the store where known, else from the pool (and then stored)."""
        es = evalset or self.calibration
        out: dict[Candidate, Evaluation] = {}
        todo: list[Candidate] = []
        for c in dict.fromkeys(candidates):
            hit = self.store.get(es.context, c)
            if hit is not None:
                out[c] = hit
                self.cached += 1
                monitoring.store_hit(self.run_id, strategy, hit)
            else:
                todo.append(c)
        bar = tqdm(total=len(todo), desc=f"{strategy}: evaluating", unit="cand", leave=False,
                   disable=not todo or os.environ.get("CULLMT_NO_PROGRESS") == "1")
        for cand, res in self.pool.evaluate(((c, es.directions) for c in todo), es.limit, es.proxy):
            ev = Evaluation(cand, res["score"], res["params"], res["bytes"], res["metrics"], res["sentences"],
                            res["seconds"], strategy, self.run_id, res["actor"])
            self.store.put(es.context, ev)
            monitoring.evaluated(ev)
            out[cand] = ev
            self.evaluated += 1
            self.sentences += res["sentences"]
            bar.update(1)
        bar.close()
        self.requested += sum(out[c].sentences for c in dict.fromkeys(candidates))
        return [out[c] for c in candidates]


def _devset(cfg: SearchRunConfig) -> DevSet:
    ds = load_devset(cfg.data.dev, cfg.data.languages, cfg.data.split)
    return ds.subsample(cfg.data.max_sentences, cfg.data.seed)


def _evalset(cfg: SearchRunConfig, ds: DevSet, dirs: list[Direction], signatures: dict, model_id: str,
             units: list[str], dispatch: str | None = None) -> EvalSet:
    desc = {"model": model_fingerprint(model_id), "units": units, "dtype": cfg.model.dtype, "eval": describe(ds, dirs),
            "metric": cfg.metric.primary, "signatures": signatures,
            "decoding": asdict(Decoding(**asdict(cfg.decoding)))}
    if dispatch:
        desc["moe_dispatch"] = dispatch
    return EvalSet(dirs, desc)


def preflight(cfg: SearchRunConfig) -> None:
    """Fail fast, in the driver, on what would otherwise fail inside every actor."""
    from transformers import AutoConfig

    from .families import resolve_model_path
    from .metrics import resolve_spm

    path = resolve_model_path(cfg.model.name)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise FamilyError(f"model.name={cfg.model.name!r}: not a local model folder, and the hub could not "
                          f"provide it ({str(e).splitlines()[0][:120]})") from None
    if "spbleu" in cfg.metric.metrics:
        resolve_spm(cfg.metric.spm)


def open_session(cfg: SearchRunConfig, run_id: str) -> Session:
    """Start (or join) Ray, load the dev set, start the pool, register the evaluation contexts."""
    ds = _devset(cfg)
    preflight(cfg)
    ensure_ray(cfg.resources.address, cfg.resources.num_cpus)
    all_dirs = parse_directions(cfg.data.directions, ds.languages)
    calib_dirs = parse_directions(cfg.data.calibration, ds.languages) if cfg.data.calibration else all_dirs
    held_dirs = [d for d in all_dirs if d not in calib_dirs] if cfg.data.heldout else []
    spec = ModelSpec(cfg.model.name, cfg.model.family, cfg.model.dtype, cfg.model.device,
                     cfg.model.trust_remote_code, cfg.model.prompt_template)
    settings = EvalSettings(cfg.metric.primary, tuple(cfg.metric.metrics), cfg.metric.spm,
                            Decoding(**asdict(cfg.decoding)))
    res = Resources(cfg.resources.actors, cfg.resources.cpus_per_actor, cfg.resources.gpus_per_actor,
                    cfg.resources.reserve_cpus, cfg.resources.placement, cfg.resources.actor_resources)
    pool = EvaluatorPool(spec, ds, settings, res, run=run_id)
    info = pool.info[0]
    store = ResultStore(cfg.output.store)
    calib = _evalset(cfg, ds, calib_dirs, info["signatures"], cfg.model.name, info["units"], info.get("dispatch"))
    calib.context = store.register_context(calib.description)
    held = None
    if held_dirs:
        held = _evalset(cfg, ds, held_dirs, info["signatures"], cfg.model.name, info["units"], info.get("dispatch"))
        held.context = store.register_context(held.description)
    return Session(cfg, run_id, pool, store, calib, held, ds)


def make_strategy(cfg: SearchRunConfig, units: list[str], baseline: Evaluation, name: str | None = None,
                  max_evaluations: int | None = None, batch: int = 4) -> BaseStrategy:
    """The configured strategy (or ``name``), over ``units`` minus the protected ones."""
    name = name or cfg.search.strategy
    if name not in STRATEGIES:
        raise SearchError(f"search.strategy={name!r}: expected one of {', '.join(STRATEGIES)}")
    bad = [u for u in cfg.search.protect if u not in units]
    if bad:
        raise SearchError(f"search.protect: {bad[0]!r} is not a unit of this model ({units[0]} .. {units[-1]})")
    space = SearchSpace(units, frozenset(cfg.search.protect), baseline.score, baseline.params)
    stop = StopRule(cfg.search.threshold, cfg.search.target_removed, cfg.search.target_params_fraction,
                    max_evaluations if max_evaluations is not None else cfg.search.max_evaluations)
    cls = STRATEGIES[name]
    opts = cfg.search.options.get(name) or {}
    if not isinstance(opts, dict):
        raise SearchError(f"search.options.{name}={opts!r}: expected a mapping of options, e.g. {{width: 3}}")
    unknown = [k for k in opts if k not in cls.options()]
    if unknown:
        raise SearchError(f"search.options.{name}.{unknown[0]}: not an option of strategy {name!r}; "
                          f"expected one of {', '.join(cls.options()) or '(none)'}")
    strategy = cls(space=space, stop=stop, seed=cfg.search.seed, batch=batch, **opts)
    strategy.check()
    return strategy


def new_run_dir(cfg: SearchRunConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output.dir) / f"{cfg.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def load_run_config(run_dir: Path) -> SearchRunConfig:
    f = run_dir / "config.yaml"
    if not f.is_file():
        raise SearchError(f"--resume {run_dir}: no config.yaml there; expected a run folder made by cullmt-ray search")
    cfg = from_dict(SearchRunConfig, yaml.safe_load(f.read_text()))
    validate(cfg)
    return cfg


def run_search(cfg: SearchRunConfig, run_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Run (or resume, when ``run_dir`` has a config) the configured search; return the run folder."""
    resuming = run_dir is not None and (run_dir / "config.yaml").exists()
    run_dir = run_dir or new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_id = run_dir.name
    t0 = time.time()
    status = {"run": run_id, "status": "running", "resumed": resuming, "config": "config.yaml",
              "started": datetime.now(timezone.utc).isoformat()}
    write_json(run_dir / "run.json", status)
    try:
        session = open_session(cfg, run_id)
    except (FamilyError, ValueError) as e:
        status.update(status="failed", error=str(e))
        write_json(run_dir / "run.json", status)
        raise
    try:
        log(f"[cullmt-ray] run {run_id}: {session.pool.size} evaluator actor(s), "
            f"{len(session.calibration.directions)} calibration direction(s), store {cfg.output.store}")
        (baseline,) = session.evaluate([BASELINE], "baseline")
        log(f"[cullmt-ray] baseline {cfg.metric.primary} = {baseline.score:.2f}, "
            f"{baseline.params / 1e6:.2f}M params")
        units = session.pool.info[0]["units"]
        strategy = make_strategy(cfg, units, baseline, batch=max(2 * session.pool.size, 4))
        if cfg.search.seed_from_store:
            strategy.seed_with([e for e in session.store.evaluations(session.calibration.context) if e.candidate])
        if cfg.search.driver == "tune":
            from .tune_driver import run_with_tune

            searcher = run_with_tune(strategy, session, cfg.resources.trial_cpus, run_dir / "tune")
            session.evaluated += searcher.computed
            session.cached += searcher.cached
            session.sentences += sum(e.sentences for e in searcher.results.values() if not e.cached)
        else:
            while batch := strategy.ask():
                strategy.tell(session.evaluate_staged(batch, strategy.name))
                write_json(run_dir / "trace.json", strategy.trace())
        trace = strategy.trace()
        write_json(run_dir / "trace.json", trace)
        heldout = score_heldout(session, trace, baseline)
        if heldout:
            write_json(run_dir / "heldout.json", heldout)
        files = write_pareto(session.store, session.calibration.context, baseline, run_dir, cfg, trace)
        status.update(
            status="finished", finished=datetime.now(timezone.utc).isoformat(), wall_seconds=round(time.time() - t0, 2),
            actors=session.pool.names, context=session.calibration.context,
            heldout_context=session.heldout.context if session.heldout else None,
            calibration=[direction_name(d) for d in session.calibration.directions],
            signatures=session.calibration.description["signatures"],
            baseline={"score": baseline.score, "params": baseline.params, "bytes": baseline.bytes},
            final={"removed": trace.get("final", []), "stop_reason": trace.get("stop_reason", "")},
            budget={"evaluations": session.evaluated, "cached": session.cached, "sentences": session.sentences},
            files={k: str(v.relative_to(run_dir)) for k, v in files.items()})
        write_json(run_dir / "run.json", status)
        log(f"[cullmt-ray] finished: removed {trace.get('final', [])} ({trace.get('stop_reason', '')}); "
            f"{session.evaluated} evaluations computed, {session.cached} read from the store")
        log(f"[cullmt-ray] Pareto front: {run_dir / 'pareto.csv'} and {run_dir / 'pareto.png'}")
        return run_dir
    except BaseException as e:
        status.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=str(e)[:500])
        write_json(run_dir / "run.json", status)
        raise
    finally:
        session.pool.shutdown()
        session.store.close()


def strategy_path(trace: dict, baseline: Evaluation) -> list[tuple[int, float]]:
    """(params, score) of the baseline and of every accepted step, for the plot."""
    pts = [(baseline.params, baseline.score)]
    for s in trace.get("steps", []):
        if s.get("accepted"):
            pts.append((s["params"], s["best_score"]))
    return pts


def score_heldout(session: Session, trace: dict, baseline: Evaluation) -> dict | None:
    """Score the baseline and the final prune set on the directions the search did not see."""
    if session.heldout is None:
        return None
    final = Candidate.of(trace.get("final", []))
    base_h, final_h = session.evaluate([BASELINE, final], "heldout", session.heldout)
    return {"directions": [direction_name(d) for d in session.heldout.directions],
            "baseline": {"score": base_h.score, "metrics": base_h.metrics},
            "final": {"removed": final.units, "score": final_h.score, "metrics": final_h.metrics,
                      "drop": round(base_h.score - final_h.score, 4)}}


def write_pareto(store: ResultStore, context: str, baseline: Evaluation, out_dir: Path, cfg: SearchRunConfig,
                 trace: dict | None = None) -> dict[str, Path]:
    evals = list(store.evaluations(context))
    paths = {trace.get("strategy", "search"): strategy_path(trace, baseline)} if trace else None
    title = f"{cfg.model.name} on {cfg.data.dev} ({len(evals)} evaluations)"
    return export_front(evals, baseline, out_dir, cfg.metric.primary, title, paths)
