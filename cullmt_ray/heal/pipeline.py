"""Heal the candidates of a search run: a recipe in five steps, read top to bottom as torchtune's are.

``HealRecipe.setup`` checks everything on the driver (run folder, candidates, corpus, dev sets, model,
units, LoRA targets) before the heal folder exists; ``kd`` has the unpruned model translate the corpus
(cached) and scores it before and after pruning; ``train`` fits LoRA adapters with Ray Train; ``export``
merges and saves each candidate with its card; ``score`` measures the healed models.

A heal folder (``RUN_DIR/heal/<name>-<UTC time>``) holds ``config.yaml`` (the resolved recipe, the
run and the candidates: enough to resume), ``heal.json`` (status, KD cache, per candidate: scores
before pruning / after pruning / after healing with signatures, training summary, paths) and one
folder per candidate with ``model/`` (merged, loads with plain transformers, with its card),
optionally ``adapter/`` + ``pruned/``, and ``train/`` (Ray Train's checkpoints).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ..atomic import write_json, write_text
from ..candidate import BASELINE, Candidate
from ..config import ConfigError, ModelConfig, SearchRunConfig, from_dict
from ..data import DevSet, Direction, direction_name, load_devset, parse_directions
from ..families import FamilyError, model_fingerprint, model_units
from ..session import ensure_ray, load_devset_of, load_run_config, new_folder, open_session, preflight
from .config import HealConfig
from .kd import KDRequest, load_corpus, reference_pairs, teacher_translations, training_pairs

logger = logging.getLogger("cullmt_ray")

MIX_DESCRIPTIONS = {"kd": "targets: the unpruned model's translations, i.e. sequence-level KD",
                    "refs": "targets: the corpus' human references",
                    "both": "targets: the unpruned model's translations and the human references"}


class HealError(ValueError):
    """A heal that cannot start or go on; one line saying why."""


# ----------------------------------------------------------------------------- candidates
def _run_info(run_dir: Path) -> dict:
    f = run_dir / "run.json"
    if not (run_dir / "config.yaml").is_file() or not f.is_file():
        raise HealError(f"{run_dir}: not a search run folder (expected config.yaml and run.json made by "
                        "cullmt-ray search)")
    info = json.loads(f.read_text())
    if info.get("status") != "finished":
        raise HealError(f"{run_dir}: the search has not finished (status {info.get('status')!r}); resume it with "
                        f"cullmt-ray search --resume {run_dir}")
    return info


def _table(run_dir: Path, name: str) -> list[dict]:
    f = run_dir / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else []


def select_candidates(run_dir: Path, specs: list[str]) -> list[Candidate]:
    """``best`` (the run's final prune set), ``pareto`` (every pruned point of its front), a candidate
    id from pareto.csv/evaluations.csv (or a unique prefix of one), or units like ``enc.1,enc.3``."""
    info = _run_info(run_dir)
    rows = _table(run_dir, "pareto") + _table(run_dir, "evaluations")
    by_key = {r["candidate"]: Candidate.of(str(r["removed_units"]).split()) for r in rows}
    out: list[Candidate] = []
    for spec in specs or ["best"]:
        spec = spec.strip()
        if spec == "best":
            final = info.get("final", {}).get("removed", [])
            if not final:
                raise HealError(f"--candidate best: the run {run_dir.name} removed nothing (its final prune set is "
                                "empty); pick another with --candidate ID or --candidate pareto")
            out.append(Candidate.of(final))
        elif spec == "pareto":
            front = [Candidate.of(str(r["removed_units"]).split()) for r in _table(run_dir, "pareto")
                     if r.get("n_removed", 0) > 0]
            if not front:
                raise HealError(f"--candidate pareto: {run_dir}/pareto.json has no pruned candidate")
            out += front
        elif "." in spec:
            out.append(Candidate.parse(spec))
        else:
            hits = sorted({k for k in by_key if k.startswith(spec)}) if spec else []
            if len(hits) != 1:
                raise HealError(f"--candidate {spec!r}: {'no' if not hits else 'more than one'} candidate of "
                                f"{run_dir.name} has that id; expected best, pareto, an id from its pareto.csv or "
                                "evaluations.csv, or units like enc.1,enc.3")
            out.append(by_key[hits[0]])
    out = list(dict.fromkeys(c for c in out))
    empty = [c for c in out if not c.removed]
    if empty:
        raise HealError("--candidate: the baseline (nothing removed) needs no healing; pick a pruned candidate")
    return out


def label(c: Candidate) -> str:
    """A folder name for a candidate: its units when few, else its id."""
    return "rm-" + "-".join(c.units) if len(c) <= 6 else f"rm{len(c)}-{c.key}"


# ----------------------------------------------------------------------------- configs
def _eval_config(run_cfg: SearchRunConfig, cfg: HealConfig, directions: list[Direction],
                 model: str | None = None) -> SearchRunConfig:
    """The run's config, scoring the heal's directions on the evaluation set (and ``model`` if given)."""
    c = copy.deepcopy(run_cfg)
    if cfg.evaluate.dev is not None:
        c.data.dev, c.data.split, c.data.max_sentences = cfg.evaluate.dev, cfg.evaluate.split, cfg.evaluate.max_sentences
    c.data.directions = [direction_name(d) for d in directions]
    c.data.calibration, c.data.heldout = None, False
    if model is not None:
        c.model.name = model
    if cfg.evaluate.store is not None:
        c.output.store = cfg.evaluate.store
    if cfg.resources.address is not None:
        c.resources.address = cfg.resources.address
    if cfg.resources.num_cpus is not None:
        c.resources.num_cpus = cfg.resources.num_cpus
    return c


def _validation_set(run_cfg: SearchRunConfig, cfg: HealConfig) -> DevSet:
    return load_devset_of(run_cfg).subsample(cfg.train.val_sentences or 1, run_cfg.data.seed)


def _scores(ev) -> dict:
    return {"score": ev.score, "metrics": ev.metrics, "params": ev.params, "bytes": ev.bytes}


def _recovered(before: dict, pruned: dict, healed: dict) -> dict:
    out = {}
    for m in healed["metrics"]:
        b, p, h = (x["metrics"][m]["mean"] for x in (before, pruned, healed))
        lost, gained = b - p, h - p
        out[m] = {"before_pruning": b, "after_pruning": p, "after_healing": h, "lost": round(lost, 4),
                  "gained": round(gained, 4), "fraction": round(gained / lost, 4) if lost > 1e-9 else None}
    return out


# ----------------------------------------------------------------------------- the recipe
def _cpu(spec: ModelConfig) -> ModelConfig:
    return replace(spec, device="cpu", dtype="float32")


@dataclass
class HealRecipe:
    """One heal: setup -> kd -> train -> export -> score (see the module doc)."""

    run_dir: Path
    specs: list[str]
    cfg: HealConfig
    heal_dir: Path | None = None
    log: Callable[[str], None] = print
    fault: dict | None = None  # tests only: one Ray Train worker exits once
    stages: dict[str, float] = field(default_factory=dict)
    status: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ 0. setup (nothing written yet)
    def setup(self) -> None:
        cfg = self.cfg
        try:
            import peft  # noqa: F401
        except ImportError:
            raise HealError("healing needs peft: pip install 'cullmt-ray[heal]' (or pip install peft)") from None
        if not self.run_dir.is_dir():
            raise HealError(f"run folder {str(self.run_dir)!r} does not exist; expected a folder made by cullmt-ray "
                            "search (results/runs/<name>-<time>)")
        self.cands = select_candidates(self.run_dir, self.specs)
        self.run_cfg = run_cfg = load_run_config(self.run_dir, flag="heal")
        languages = list(load_devset(run_cfg.data.dev, run_cfg.data.languages, run_cfg.data.split).languages)
        self.directions = parse_directions(cfg.directions if cfg.directions is not None else run_cfg.data.directions,
                                           languages)
        self.corpus = load_corpus(cfg.corpus.path, languages, cfg.corpus.split)
        self.eval_cfg = _eval_config(run_cfg, cfg, self.directions)
        load_devset(self.eval_cfg.data.dev, self.eval_cfg.data.languages, self.eval_cfg.data.split)
        self.val_ds = _validation_set(run_cfg, cfg) if cfg.train.val_sentences else None
        preflight(self.eval_cfg)
        self.family_cls, units = model_units(run_cfg.model)
        self.units_total = len(units)
        for c in self.cands:
            bad = [u for u in c.units if u not in units]
            if bad:
                raise FamilyError(f"--candidate: unit {bad[0]!r} is not in {run_cfg.model.name}; its units are "
                                  f"{units[0]} .. {units[-1]}")
        if cfg.lora.target_modules != "auto":
            from ..families import load_family
            from .lora import resolve_targets

            resolve_targets(load_family(_cpu(run_cfg.model)), cfg.lora.target_modules)

    def _lap(self, stage: str) -> None:
        now = time.time()
        self.stages[stage] = round(self.stages.get(stage, 0.0) + now - self._clock, 2)
        self._clock = now

    def _write_status(self, **fields) -> None:
        self.status.update(fields)
        write_json(self.heal_dir / "heal.json", self.status)

    # ------------------------------------------------------------------ 1. KD data and scores before
    def kd(self) -> None:
        """One pool of the unpruned model: KD data, validation teacher outputs, scores before/after pruning."""
        cfg, run_cfg = self.cfg, self.run_cfg
        with open_session(self.eval_cfg, "heal", folder=False, run_id=f"{self.heal_dir.name}-teacher") as session:
            kd_info, kd_df, refs_df = None, None, None
            fp = model_fingerprint(run_cfg.model.name)
            if cfg.mix in ("kd", "both"):
                req = KDRequest(fp, run_cfg.model.dtype, self.corpus, tuple(self.directions), cfg.corpus.max_sentences,
                                cfg.corpus.seed, cfg.kd.decoding)
                kd_df, kd_info = teacher_translations(session.pool, req, cfg.kd.cache, cfg.kd.chunk, self.log)
                self.log(f"[cullmt-ray heal] KD data: {kd_info['pairs']} pairs "
                         f"({'from the cache' if kd_info['cached'] else 'made now'}) {kd_info['path']}")
            if cfg.mix in ("refs", "both"):
                refs_df = reference_pairs(self.corpus, self.directions, cfg.corpus.max_sentences, cfg.corpus.seed)
            self.pairs = training_pairs(kd_df, refs_df, cfg.mix)
            self.val_groups = []
            if self.val_ds is not None:
                vreq = KDRequest(fp, run_cfg.model.dtype, self.val_ds, tuple(self.directions), None, 0,
                                 run_cfg.decoding)
                vdf, _ = teacher_translations(session.pool, vreq, cfg.kd.cache, cfg.kd.chunk, log=lambda s: None)
                for (s, t), g in vdf.groupby(["src_lang", "tgt_lang"], sort=False):
                    self.val_groups.append({"src_lang": s, "tgt_lang": t, "sources": list(g.source),
                                            "references": list(g.reference), "teacher": list(g.teacher)})
            self._write_status(kd=kd_info, training_pairs=len(self.pairs))
            self._lap("start_and_kd")
            evals = session.evaluate([BASELINE, *self.cands], "heal")
            self.before, self.pruned = _scores(evals[0]), {c: _scores(e) for c, e in zip(self.cands, evals[1:])}
            self.signatures = session.signatures
            self.eval_desc = session.calibration.description["eval"]
            self.log(f"[cullmt-ray heal] {run_cfg.metric.primary} on {self.eval_desc['source']}: "
                     f"{self.before['score']:.2f} before pruning; "
                     + ", ".join(f"{label(c)} {self.pruned[c]['score']:.2f}" for c in self.cands))
        self._lap("scores_before")

    # ------------------------------------------------------------------ 2. LoRA with Ray Train
    def train(self) -> None:
        """Several candidates at once when the cluster fits them."""
        import ray

        from .lora import train_lora

        cfg, run_cfg, eval_cfg = self.cfg, self.run_cfg, self.eval_cfg
        settings = {"train": asdict(cfg.train), "lora": asdict(cfg.lora), "resources": asdict(cfg.resources),
                    "spm": eval_cfg.metric.spm_for(eval_cfg.model.name), "metrics": eval_cfg.metric.scored,
                    "primary": eval_cfg.metric.primary, "decoding": asdict(run_cfg.decoding)}
        storage = cfg.train.storage
        if storage and "://" not in storage:
            storage = str(Path(storage).expanduser().resolve())
        storage = storage or str((self.heal_dir / "train").resolve())
        per = cfg.resources.workers * cfg.resources.cpus_per_worker
        fits = max(1, int(float(ray.cluster_resources().get("CPU", 1)) // per))
        parallel = min(len(self.cands), cfg.resources.parallel or fits)
        self.log(f"[cullmt-ray heal] training {len(self.cands)} candidate(s) on {len(self.pairs)} pairs ({cfg.mix}), "
                 f"{cfg.resources.workers} worker(s) each, {parallel} at a time")

        def one(c: Candidate):
            return train_lora(run_cfg.model, c.units, self.pairs, self.val_groups, settings, storage,
                              f"{self.heal_dir.name}-{label(c)}", fault=self.fault, log=self.log)

        with ThreadPoolExecutor(max_workers=parallel) as ex:
            self.outcomes = dict(zip(self.cands, ex.map(one, self.cands)))
        self._lap("train")

    # ------------------------------------------------------------------ 3. merge and save
    def export(self) -> None:
        from ..families import load_family
        from ..families import stored_dtype
        from .export import merged_family, save_adapter, save_merged
        from .lora import chosen_adapter, resolve_targets

        cfg, spec = self.cfg, self.run_cfg.model
        dtype = stored_dtype(spec.name) if cfg.export.dtype == "auto" else cfg.export.dtype
        self.exported = []
        for c in self.cands:
            out = self.heal_dir / label(c)
            with self.outcomes[c].checkpoint.as_directory() as ck:
                adapter = chosen_adapter(ck)
                with merged_family(spec, c.units, adapter) as fam:
                    targets = resolve_targets(fam, cfg.lora.target_modules)
                    size = save_merged(fam, out / "model", dtype)
                if cfg.export.keep_adapter:
                    pruned_dir = out / "pruned"
                    load_family(_cpu(spec)).export(c.units, pruned_dir,
                                                   {"note": "the pruned base the adapter in ../adapter applies to"})
                    save_adapter(adapter, out / "adapter", pruned_dir)
            self.exported.append({"candidate": c, "folder": label(c), "model_dir": str((out / "model").resolve()),
                                  "size": size, "targets": targets})
        self._lap("export")

    # ------------------------------------------------------------------ 4. scores of the healed models, cards
    def score(self) -> list[dict]:
        from ..card import healed_card, write_card

        cfg, run_cfg = self.cfg, self.run_cfg
        self.log(f"[cullmt-ray heal] exported {len(self.exported)} model(s); scoring them on {self.eval_desc['source']}")
        final = []
        for r in self.exported:
            c, oc = r["candidate"], self.outcomes[r["candidate"]]
            with open_session(_eval_config(run_cfg, cfg, self.directions, model=r["model_dir"]), "heal", folder=False,
                              run_id=f"{self.heal_dir.name}-{c.key[:8]}") as s:
                (ev,) = s.evaluate([BASELINE], "heal")
            healed = _scores(ev)
            scores = {"before_pruning": self.before, "after_pruning": self.pruned[c], "after_healing": healed}
            st = oc.state
            train_summary = {"steps": st["step"], "epochs": st["step"] / max(1, st["steps_per_epoch"]),
                             "pairs": len(self.pairs), "examples": st["examples"], "workers": cfg.resources.workers,
                             "seconds": round(oc.seconds, 2), "started": oc.started, "finished": oc.finished,
                             "restarts": st["restarts"], "resumed_from": st["resumed_from"],
                             "trainable_params": st["trainable_params"], "checkpoint": oc.checkpoint.path,
                             "exported_step": st.get("best", {}).get("step", st["step"]),
                             "best_val_kl": st.get("best", {}).get("val_kl"),
                             "history": oc.history}
            info = {"base_model": run_cfg.model.name, "base_fingerprint": model_fingerprint(run_cfg.model.name),
                    "family": self.family_cls.name, "causal": self.family_cls.causal, "removed_units": c.units, "candidate_id": c.key,
                    "units_total": self.units_total, "run_dir": str(self.run_dir), "model_dir": r["model_dir"],
                    "directions": [direction_name(d) for d in self.directions],
                    "primary_metric": run_cfg.metric.primary, "signatures": self.signatures,
                    "evaluation": self.eval_desc,
                    "validation": {"source": self.val_ds.source if self.val_ds is not None else None,
                                   "sentences": len(self.val_ds) if self.val_ds is not None else 0},
                    "size": {"before_pruning": {"params": self.before["params"], "bytes": self.before["bytes"]},
                             "after_pruning": {"params": self.pruned[c]["params"], "bytes": self.pruned[c]["bytes"]},
                             "healed": r["size"]},
                    "scores": scores, "recovered": _recovered(self.before, self.pruned[c], healed),
                    "mix": cfg.mix, "mix_description": MIX_DESCRIPTIONS[cfg.mix], "kd": self.status.get("kd"),
                    "lora_targets": r["targets"], "training": train_summary, "heal_config": cfg.to_dict(),
                    "search_config": run_cfg.to_dict()}
            write_card(r["model_dir"], info, healed_card(info))
            final.append({"folder": r["folder"], "removed": c.units, "id": c.key, "model_dir": r["model_dir"],
                          "adapter_dir": str(Path(r["model_dir"]).parent / "adapter") if cfg.export.keep_adapter
                          else None, "scores": scores, "recovered": info["recovered"], "size": info["size"],
                          "training": {k: v for k, v in train_summary.items() if k != "history"},
                          "signatures": self.signatures})
        self._lap("scores_after")
        return final

    def _check_stale(self) -> None:
        """A heal being resumed: refuse while its driver still runs; say so when it was left running."""
        from ..session import driver_alive

        try:
            info = json.loads((self.heal_dir / "heal.json").read_text())
        except (OSError, ValueError):
            return
        if isinstance(info, dict) and info.get("status") == "running":
            if driver_alive(info):
                raise ConfigError(f"--resume {self.heal_dir}: the heal is still running (driver pid {info['pid']}); "
                                  "wait for it to end or stop it first")
            logger.warning("%s was left 'running' by a driver that is gone; resuming it", self.heal_dir)

    # ------------------------------------------------------------------ the whole recipe
    def run(self) -> Path:
        self.setup()
        self.heal_dir = self.heal_dir or new_folder(self.run_dir / "heal", self.cfg.name)
        resuming = (self.heal_dir / "config.yaml").exists()
        if resuming:
            self._check_stale()
        self.heal_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            write_text(self.heal_dir / "config.yaml", yaml.safe_dump(
                {"run_dir": str(self.run_dir.resolve()), "candidates": [c.units for c in self.cands],
                 "heal": self.cfg.to_dict()}, sort_keys=False))
        self.status = {"heal": self.heal_dir.name, "status": "running", "resumed": resuming,
                       "run_dir": str(self.run_dir),
                       "candidates": [{"removed": c.units, "id": c.key, "folder": label(c)} for c in self.cands],
                       "started": datetime.now(timezone.utc).isoformat(), "stages_seconds": self.stages,
                       "pid": os.getpid(), "host": socket.gethostname()}
        self._write_status()
        t_start = self._clock = time.time()
        try:
            ensure_ray(self.eval_cfg.resources.address, self.eval_cfg.resources.num_cpus)
            self.kd()
            self.train()
            self.export()
            results = self.score()
            self._write_status(status="finished", finished=datetime.now(timezone.utc).isoformat(),
                               wall_seconds=round(time.time() - t_start, 2), results=results)
            primary = self.run_cfg.metric.primary
            for r in results:
                rec = r["recovered"].get(primary, {})
                self.log(f"[cullmt-ray heal] {r['folder']}: {primary} {rec.get('before_pruning', 0):.2f} before "
                         f"pruning, {rec.get('after_pruning', 0):.2f} pruned, {rec.get('after_healing', 0):.2f} "
                         f"healed -> {r['model_dir']}")
            return self.heal_dir
        except BaseException as e:
            self._write_status(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                               error=(str(e).strip().splitlines() or [type(e).__name__])[0][:500])
            raise


def run_heal(run_dir: str | Path, candidates: list[str], cfg: HealConfig, heal_dir: str | Path | None = None,
             log: Callable[[str], None] | None = None, fault: dict | None = None) -> Path:
    """Heal ``candidates`` (see :func:`select_candidates`) of the search in ``run_dir``; return the heal folder.

    With ``heal_dir`` holding a ``config.yaml`` from an earlier (killed) heal, that heal resumes: the
    KD cache and the training checkpoints are reused.
    """
    return HealRecipe(Path(run_dir), list(candidates), cfg, Path(heal_dir) if heal_dir else None,
                      log or logger.info, fault).run()


def resume_heal(heal_dir: str | Path, log: Callable[[str], None] | None = None) -> Path:
    heal_dir = Path(heal_dir)
    f = heal_dir / "config.yaml"
    if not f.is_file():
        raise HealError(f"--resume {heal_dir}: no config.yaml there; expected a folder made by cullmt-ray heal")
    try:
        saved = yaml.safe_load(f.read_text())
        cfg = from_dict(HealConfig, saved["heal"])
        specs = [",".join(units) for units in saved["candidates"]]
        run_dir = saved["run_dir"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume {heal_dir}: config.yaml is not one cullmt-ray heal wrote ({e})") from None
    return run_heal(run_dir, specs, cfg, heal_dir, log)
