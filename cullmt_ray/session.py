"""One session per verb: Ray, preflight, the evaluator pool, the store, the run folder and its status.

``with open_session(cfg, verb="search") as s:`` checks what can be checked on the driver (dev set,
model, SentencePiece model, store) before anything is written, then creates the run folder
(``config.yaml`` + ``run.json``), starts or joins Ray and the pool, and gives the verb one
:class:`~cullmt_ray.evaluation.EvaluationService`. Leaving the block shuts the pool down and closes
the store; an exception marks ``run.json`` failed (or interrupted) with its one-line reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .atomic import write_json, write_text
from .candidate import Candidate, Evaluation
from .config import ConfigError, SearchRunConfig, from_dict
from .data import DevSet, direction_name, load_devset, parse_directions
from .evaluation import EvalSet, EvaluationService
from .store import ResultStore

log = logging.getLogger("cullmt_ray")


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


@contextmanager
def ray_quiet() -> Iterator[None]:
    """Hide what Ray's C++ core prints on the process's stderr while it starts a cluster or actors
    (the token-auth notice, core_worker lines), unless logging is at debug level (``-v``)."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (auto, ray://, or a head's GCS) or start a local cluster.

    Inside a Ray job (``cullmt-ray submit``) ``RAY_ADDRESS`` names the job's cluster: joined, never a new one.
    """
    import ray

    if ray.is_initialized():
        return
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(f"resources.address={address!r} is a dashboard address: run the command there with "
                       f"cullmt-ray submit --address {address} -- COMMAND, or give auto, ray://HOST:10001 or HOST:6379")
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = not log.isEnabledFor(logging.DEBUG)
    kw: dict = {"include_dashboard": False, "log_to_driver": not quiet, "configure_logging": False}
    if quiet:
        kw["logging_level"] = logging.ERROR
    with ray_quiet():
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)


def preflight(cfg: SearchRunConfig) -> None:
    """Fail fast, in the driver, on what would otherwise fail inside every actor."""
    from transformers import AutoConfig

    from .families import FamilyError, resolve_model_path
    from .metrics import resolve_spm

    path = resolve_model_path(cfg.model.name)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise FamilyError(f"model.name={cfg.model.name!r}: not a local model folder, and the hub could not "
                          f"provide it ({str(e).splitlines()[0][:120]})") from None
    if "spbleu" in cfg.metric.scored:
        resolve_spm(cfg.metric.spm_for(cfg.model.name))


def load_devset_of(cfg: SearchRunConfig) -> DevSet:
    ds = load_devset(cfg.data.dev, cfg.data.languages, cfg.data.split)
    return ds.subsample(cfg.data.max_sentences, cfg.data.seed)


def new_folder(parent: str | Path, name: str) -> Path:
    """``parent/<name>-<UTC time>``, made unique; not created."""
    base = Path(parent) / f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def load_run_config(run_dir: str | Path, flag: str = "--resume") -> SearchRunConfig:
    """The resolved config of a run folder made by cullmt-ray."""
    f = Path(run_dir) / "config.yaml"
    if not f.is_file():
        raise ConfigError(f"{flag} {run_dir}: no config.yaml there; expected a run folder made by cullmt-ray")
    try:
        data = yaml.safe_load(f.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(SearchRunConfig, data)


@dataclass
class Session:
    """What a verb has at hand: pool, store, evaluation service, contexts, run folder and status."""

    cfg: SearchRunConfig
    run_id: str
    run_dir: Path | None
    service: EvaluationService
    calibration: EvalSet
    heldout: EvalSet | None
    status: dict = field(default_factory=dict)

    @property
    def pool(self):
        return self.service.pool

    @property
    def store(self) -> ResultStore:
        return self.service.store

    @property
    def devset(self) -> DevSet:
        return self.service.devset

    @property
    def units(self) -> list[str]:
        return self.pool.info[0]["units"]

    @property
    def signatures(self) -> dict[str, str]:
        return self.calibration.description["signatures"]

    @property
    def batch(self) -> int:
        """Candidates per strategy ask: enough to keep every actor busy."""
        return max(2 * self.pool.size, 4)

    def evaluate(self, candidates: list[Candidate], strategy: str, es: EvalSet | None = None) -> list[Evaluation]:
        return self.service.evaluate(candidates, strategy, es or self.calibration)

    def evaluate_staged(self, candidates: list[Candidate], strategy: str) -> list[Evaluation]:
        return self.service.evaluate_staged(candidates, strategy, self.calibration)

    def write_status(self, **fields) -> None:
        """Update ``run.json`` (atomically); a session without a run folder only keeps the fields."""
        self.status.update(fields)
        if self.run_dir is not None:
            write_json(self.run_dir / "run.json", self.status)

    def finish(self, **fields) -> None:
        self.write_status(status="finished", finished=now(), budget=self.service.budget.as_dict(), **fields)


@contextmanager
def open_session(cfg: SearchRunConfig, verb: str = "search", run_dir: Path | None = None, folder: bool = True,
                 run_id: str | None = None) -> Iterator[Session]:
    """Check inputs, then (with ``folder``) create or reopen the run folder, start the pool; see the module doc."""
    from .evaluator import EvaluatorPool, EvalSettings

    ds = load_devset_of(cfg)
    preflight(cfg)
    all_dirs = parse_directions(cfg.data.directions, ds.languages)
    calib_dirs = parse_directions(cfg.data.calibration, ds.languages) if cfg.data.calibration else all_dirs
    held_dirs = [d for d in all_dirs if d not in calib_dirs] if cfg.data.heldout else []
    store = ResultStore(cfg.output.store)
    resuming = run_dir is not None and (run_dir / "config.yaml").exists()
    if folder:
        run_dir = run_dir or new_folder(cfg.output.dir, cfg.name if verb == "search" else f"{cfg.name}-{verb}")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_id = run_id or (run_dir.name if run_dir is not None else f"{verb}-{os.getpid()}")
    status = {"run": run_id, "verb": verb, "status": "running", "resumed": resuming, "config": "config.yaml",
              "started": now(), "pid": os.getpid()}
    session, pool = None, None
    try:
        if folder:
            write_json(run_dir / "run.json", status)
        ensure_ray(cfg.resources.address, cfg.resources.num_cpus)
        settings = EvalSettings(cfg.metric.primary, tuple(cfg.metric.scored), cfg.metric.spm_for(cfg.model.name),
                                cfg.decoding, block=cfg.search.racing_chunk if cfg.search.racing else None)
        with ray_quiet():
            pool = EvaluatorPool(cfg.model, ds, settings, cfg.resources, run=run_id)
        service = EvaluationService(cfg, pool, store, ds, run_id)
        calib = service.evalset(calib_dirs)
        held = service.evalset(held_dirs) if held_dirs else None
        session = Session(cfg, run_id, run_dir if folder else None, service, calib, held, status)
        session.write_status(actors=pool.names, context=calib.context,
                             heldout_context=held.context if held else None,
                             calibration=[direction_name(d) for d in calib_dirs],
                             signatures=calib.description["signatures"])
        log.info("%s %s: %d evaluator actor(s), %d calibration direction(s), store %s", verb, run_id, pool.size,
                 len(calib_dirs), cfg.output.store)
        yield session
        if status["status"] == "running":
            session.finish()
    except BaseException as e:
        status.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                      error=(str(e).strip().splitlines() or [type(e).__name__])[0][:500], finished=now())
        if folder:
            write_json(run_dir / "run.json", status)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        store.close()
