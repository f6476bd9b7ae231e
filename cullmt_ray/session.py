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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .atomic import write_json, write_text
from .candidate import Candidate, Evaluation
from .config import ConfigError, SearchRunConfig, from_dict
from .data import DevSet, direction_name, load_devset, parse_directions
from .evaluation import EvalSet, EvaluationService, RunError
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
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    with ray_quiet():
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
    if callable(on_term):  # Ray's core replaces it with one that aborts; keep the CLI's (run.json "interrupted")
        signal.signal(signal.SIGTERM, on_term)


def stop_ray() -> None:
    """Shut Ray down. A local cluster this process started loses its autoscaler monitor first (SIGKILL): Ray's own
    shutdown stops the GCS before it, then gives it 1 s to exit on SIGTERM, which it spends reporting to the GCS that
    is gone, and kills it anyway; the same end, ~1 s sooner. A driver connected to a cluster holds no processes."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception as e:  # noqa: BLE001 - Ray's private layout changed: its own shutdown stops it, 1 s later
        log.debug("autoscaler monitor not stopped ahead of Ray (%s)", e)
    ray.shutdown()


def preflight(cfg: SearchRunConfig) -> None:
    """Fail fast, in the driver, on what would otherwise fail inside every actor."""
    from .metrics import resolve_spm
    from .model_files import read_config, resolve_model_path

    path = resolve_model_path(cfg.model.name)
    read_config(cfg.model.name, cfg.model.trust_remote_code, cfg.model.family)
    if Path(path).is_dir():
        check_weight_files(Path(path))
    if "spbleu" in cfg.metric.scored:
        resolve_spm(cfg.metric.spm_for(cfg.model.name))


def check_weight_files(folder: Path) -> None:
    """Every ``*.safetensors`` in a local model folder has a readable header whose tensors fit in the file
    (a truncated or garbage file is one line naming it, here, instead of an actor dying on it)."""
    import json
    import struct

    from .model_files import FamilyError

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")) and not any(folder.glob("*.pt")):
        raise FamilyError(f"model folder {folder}: no weight file (*.safetensors or *.bin)")
    for f in files:
        size = f.stat().st_size
        why = ""
        try:
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 2 <= n <= min(size - 8, 100 * 2**20):
                    why = f"its header length ({n}) does not fit the file ({size} bytes)"
                else:
                    header = json.loads(fh.read(n))
                    if not isinstance(header, dict):
                        raise ValueError("not a mapping")
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                    if 8 + n + end > size:
                        why = f"truncated: its tensors need {8 + n + end} bytes, the file has {size}"
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
            why = f"unreadable header ({type(e).__name__})"
        if why:
            raise FamilyError(f"model weights {f}: not a valid safetensors file: {why}")


def check_output_dir(folder: str | Path, where: str = "output.dir") -> None:
    """``folder`` exists as a writable folder or can be created: tried (and undone) under its nearest
    existing parent, so a file in the way, /proc or a read-only mount is one line, before anything is written."""
    import tempfile

    p = Path(folder).expanduser().absolute()
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{where}={str(folder)!r}: {parent} is a file, not a folder; expected a writable folder")
    try:
        probe = tempfile.mkdtemp(prefix=".cullmt-check-", dir=parent)
    except OSError as e:
        raise ConfigError(f"{where}={str(folder)!r}: cannot write under {parent} ({e.strerror or e}); "
                          "expected a writable folder") from None
    os.rmdir(probe)


def check_search(cfg: SearchRunConfig, units: list[str], strategies: list[str] | None = None,
                 target_removed: int | None = None) -> None:
    """Protected units and each strategy's target range, against the model's units (a dummy baseline)."""
    from .candidate import BASELINE
    from .strategies import make_strategy

    dummy = Evaluation(BASELINE, 0.0, 1, 1, {}, 0, 0.0)
    for name in strategies or [cfg.search.strategy]:
        make_strategy(cfg.search, units, dummy, name=name, target_removed=target_removed)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(before: dict, after: dict) -> list[str]:
    a, b = _flatten(before), _flatten(after)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))


def driver_alive(info: dict) -> bool:
    """The driver that wrote ``run.json`` still runs on this host (a cullmt-ray process with its pid)."""
    import socket

    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or info.get("host", socket.gethostname()) != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return b"cullmt" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def check_resume(run_dir: Path, cfg: SearchRunConfig, accept_config_changes: bool = False) -> dict:
    """The previous ``run.json`` of a run folder being resumed, after refusing a run whose driver still
    runs or whose config.yaml was edited since it started (unless ``accept_config_changes``)."""
    import json

    f = run_dir / "run.json"
    try:
        info = json.loads(f.read_text()) if f.exists() else {}
    except (OSError, ValueError):
        raise ConfigError(f"--resume {run_dir}: run.json is not readable JSON; expected a run folder made by "
                          "cullmt-ray") from None
    if not isinstance(info, dict):
        raise ConfigError(f"--resume {run_dir}: run.json is not a mapping; expected a run folder made by cullmt-ray")
    if info.get("status") == "running":
        if driver_alive(info):
            raise ConfigError(f"--resume {run_dir}: the run is still running (driver pid {info['pid']}); wait for "
                              "it to end or stop it first")
        log.warning("%s was left 'running' by a driver that is gone (pid %s); resuming it", run_dir, info.get("pid"))
    snapshot = info.get("config_snapshot")
    if isinstance(snapshot, dict):
        diff = changed_keys(snapshot, json.loads(json.dumps(cfg.to_dict(), default=str)))
        if diff and not accept_config_changes:
            raise ConfigError(f"--resume {run_dir}: config.yaml was edited since the run started ({', '.join(diff[:6])}"
                              f"{', ...' if len(diff) > 6 else ''}); restore it, start a new run, or pass "
                              "--accept-config-changes")
        if diff:
            log.warning("%s: resuming with an edited config (%s)", run_dir, ", ".join(diff))
    return info


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

    def keep_study(self, strategy, label: str | None = None) -> None:
        """An Optuna strategy keeps its study in the results database (PostgreSQL), named
        ``RUN:LABEL`` (default the strategy's name), for optuna-dashboard; a no-op for SQLite stores."""
        storage = self.store.optuna_storage()
        if storage is not None and hasattr(strategy, "keep_study"):
            strategy.keep_study(storage, f"{self.run_id}:{label or strategy.name}")

    def write_status(self, **fields) -> None:
        """Update ``run.json`` (atomically); a session without a run folder only keeps the fields."""
        self.status.update(fields)
        if self.run_dir is not None:
            write_json(self.run_dir / "run.json", self.status)

    def finish(self, **fields) -> None:
        self.write_status(status="finished", finished=now(), budget=self.service.budget.as_dict(),
                          evaluations_all_attempts=self.store.count(run=self.run_id), **fields)


SEARCHING_VERBS = ("search", "compare", "calibration")


@contextmanager
def open_session(cfg: SearchRunConfig, verb: str = "search", run_dir: Path | None = None, folder: bool = True,
                 run_id: str | None = None, check: Callable[[list[str], list, DevSet], None] | None = None,
                 accept_config_changes: bool = False, record: dict | None = None) -> Iterator[Session]:
    """Check inputs, then (with ``folder``) create or reopen the run folder, start the pool; see the module doc.

    Everything that can be checked on the driver is, before the folder exists: dev set, directions,
    model config and weight headers, SentencePiece model, units and the strategy's settings (and
    ``check(units, directions, devset)``, a verb's own), the output folder, the store. ``record``:
    fields kept in ``run.json`` (e.g. a verb's arguments, so that ``--resume`` can replay it)."""
    import socket

    from .evaluator import EvaluatorPool, EvalSettings
    from .model_files import model_units

    ds = load_devset_of(cfg)
    preflight(cfg)
    all_dirs = parse_directions(cfg.data.directions, ds.languages)
    calib_dirs = parse_directions(cfg.data.calibration, ds.languages) if cfg.data.calibration else all_dirs
    held_dirs = [d for d in all_dirs if d not in calib_dirs] if cfg.data.heldout else []
    if verb in SEARCHING_VERBS or check is not None:
        _, units = model_units(cfg.model.name, cfg.model.family, cfg.model.trust_remote_code)
        if verb in SEARCHING_VERBS and check is None:
            check_search(cfg, units)
        if check is not None:
            check(units, all_dirs, ds)
    resuming = run_dir is not None and (run_dir / "config.yaml").exists()
    previous = check_resume(run_dir, cfg, accept_config_changes) if resuming else {}
    if folder and not resuming:
        check_output_dir(cfg.output.dir)
    store = ResultStore(cfg.output.store)
    try:
        if folder:
            run_dir = run_dir or new_folder(cfg.output.dir, cfg.name if verb == "search" else f"{cfg.name}-{verb}")
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resuming:
                write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except BaseException:
        store.close()
        raise
    run_id = run_id or (run_dir.name if run_dir is not None else f"{verb}-{os.getpid()}")
    status = {"run": run_id, "verb": verb, "status": "running", "resumed": resuming, "config": "config.yaml",
              "started": now(), "pid": os.getpid(), "host": socket.gethostname(),
              "attempt": int(previous.get("attempt", 1)) + 1 if resuming else 1, "config_snapshot": cfg.to_dict()}
    if record or previous.get("record"):
        status["record"] = record or previous["record"]
    session, pool, service = None, None, None
    try:
        if folder:
            write_json(run_dir / "run.json", status)
        ensure_ray(cfg.resources.address, cfg.resources.num_cpus)
        settings = EvalSettings(cfg.metric.primary, tuple(cfg.metric.scored), cfg.metric.spm_for(cfg.model.name),
                                cfg.decoding, block=cfg.search.racing_chunk if cfg.search.racing is True else None)
        with ray_quiet():
            pool = EvaluatorPool(cfg.model, ds, settings, cfg.resources, run=run_id)
        service = EvaluationService(cfg, pool, store, ds, run_id,
                                    racing=cfg.search.races(verb, pool.exact_rows))
        calib = service.evalset(calib_dirs)
        held = service.evalset(held_dirs) if held_dirs else None
        session = Session(cfg, run_id, run_dir if folder else None, service, calib, held, status)
        session.write_status(actors=pool.names, context=calib.context,
                             heldout_context=held.context if held else None,
                             calibration=[direction_name(d) for d in calib_dirs],
                             signatures=calib.description["signatures"])
        log.info("%s %s: %d evaluator actor(s), %d calibration direction(s), store %s", verb, run_id, pool.size,
                 len(calib_dirs), store.name)
        yield session
        if status["status"] == "running":
            session.finish()
    except BaseException as exc:
        e = exc
        if isinstance(e, RunError):  # the pool knows no run folder: say here how to go on
            how = f"cullmt-ray {verb} --resume {run_dir}" if folder and verb in ("search", "compare") \
                else f"run cullmt-ray {verb} again"
            e = RunError(f"{e}: resume the run ({how})")
        status.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                      error=(str(e).strip().splitlines() or [type(e).__name__])[0][:500], finished=now())
        if folder:
            write_json(run_dir / "run.json", status)
        if e is not exc:
            raise e from exc
        raise
    finally:
        try:
            if service is not None:
                service.close()
        finally:
            if pool is not None:
                pool.shutdown()
            store.close()
