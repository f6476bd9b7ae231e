"""Heal the candidates of a search run: KD data -> LoRA with Ray Train -> merged export -> scores.

A heal folder (``RUN_DIR/heal/<name>-<UTC time>``) holds ``config.yaml`` (the resolved recipe, the
run and the candidates: enough to resume), ``heal.json`` (status, KD cache, per candidate: scores
before pruning / after pruning / after healing with signatures, training summary, paths) and one
folder per candidate with ``model/`` (merged, loads with plain transformers, with its card),
optionally ``adapter/`` + ``pruned/``, and ``train/`` (Ray Train's checkpoints).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ..atomic import write_json, write_text
from ..candidate import BASELINE, Candidate
from ..config import SearchRunConfig
from ..data import DevSet, Direction, direction_name, load_devset, parse_directions
from ..families import Decoding, FamilyError, ModelSpec, model_fingerprint
from .config import HealConfig, from_dict, validate_heal
from .kd import KDRequest, load_corpus, reference_pairs, teacher_translations, training_pairs

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
            out.append(Candidate.of(u.strip() for u in spec.split(",") if u.strip()))
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
    ds = load_devset(run_cfg.data.dev, run_cfg.data.languages, run_cfg.data.split)
    ds = ds.subsample(run_cfg.data.max_sentences, run_cfg.data.seed)
    return ds.subsample(cfg.train.val_sentences or 1, run_cfg.data.seed)


def _spec(run_cfg: SearchRunConfig) -> ModelSpec:
    m = run_cfg.model
    return ModelSpec(m.name, m.family, m.dtype, m.device, m.trust_remote_code, m.prompt_template)


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


# ----------------------------------------------------------------------------- the heal
def new_heal_dir(run_dir: Path, name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = run_dir / "heal" / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def run_heal(run_dir: str | Path, candidates: list[str], cfg: HealConfig, heal_dir: str | Path | None = None,
             log: Callable[[str], None] = print, fault: dict | None = None) -> Path:
    """Heal ``candidates`` (see :func:`select_candidates`) of the search in ``run_dir``; return the heal folder.

    With ``heal_dir`` holding a ``config.yaml`` from an earlier (killed) heal, that heal resumes: the
    KD cache and the training checkpoints are reused.
    """
    from ..search import ensure_ray, load_run_config, preflight

    try:
        import peft  # noqa: F401
    except ImportError:
        raise HealError("healing needs peft: pip install 'cullmt-ray[heal]' (or pip install peft)") from None
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HealError(f"run folder {str(run_dir)!r} does not exist; expected a folder made by cullmt-ray search "
                        "(results/runs/<name>-<time>)")
    cands = select_candidates(run_dir, candidates)
    run_cfg = load_run_config(run_dir)
    languages = list(load_devset(run_cfg.data.dev, run_cfg.data.languages, run_cfg.data.split).languages)
    directions = parse_directions(cfg.directions if cfg.directions is not None else run_cfg.data.directions, languages)
    corpus = load_corpus(cfg.corpus.path, languages, cfg.corpus.split)
    eval_cfg = _eval_config(run_cfg, cfg, directions)
    load_devset(eval_cfg.data.dev, eval_cfg.data.languages, eval_cfg.data.split)  # fail fast on a bad set
    val_ds = _validation_set(run_cfg, cfg) if cfg.train.val_sentences else None
    preflight(eval_cfg)
    _check_units_and_targets(run_cfg, cfg, cands)

    heal_dir = Path(heal_dir) if heal_dir else new_heal_dir(run_dir, cfg.name)
    resuming = (heal_dir / "config.yaml").exists()
    heal_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        write_text(heal_dir / "config.yaml", yaml.safe_dump(
            {"run_dir": str(run_dir.resolve()), "candidates": [c.units for c in cands], "heal": cfg.to_dict()},
            sort_keys=False))
    status = {"heal": heal_dir.name, "status": "running", "resumed": resuming, "run_dir": str(run_dir),
              "candidates": [{"removed": c.units, "id": c.key, "folder": label(c)} for c in cands],
              "started": datetime.now(timezone.utc).isoformat()}
    write_json(heal_dir / "heal.json", status)
    t_start = time.time()
    try:
        ensure_ray(eval_cfg.resources.address, eval_cfg.resources.num_cpus)
        results = _heal(run_dir, run_cfg, cfg, cands, directions, corpus, eval_cfg, val_ds, heal_dir, status,
                        log, fault)
        status.update(status="finished", finished=datetime.now(timezone.utc).isoformat(),
                      wall_seconds=round(time.time() - t_start, 2), results=results)
        write_json(heal_dir / "heal.json", status)
        for r in results:
            rec = r["recovered"].get(run_cfg.metric.primary, {})
            log(f"[cullmt-ray heal] {r['folder']}: {run_cfg.metric.primary} {rec.get('before_pruning', 0):.2f} before "
                f"pruning, {rec.get('after_pruning', 0):.2f} pruned, {rec.get('after_healing', 0):.2f} healed -> "
                f"{r['model_dir']}")
        return heal_dir
    except BaseException as e:
        status.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=str(e)[:500])
        write_json(heal_dir / "heal.json", status)
        raise


def resume_heal(heal_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    heal_dir = Path(heal_dir)
    f = heal_dir / "config.yaml"
    if not f.is_file():
        raise HealError(f"--resume {heal_dir}: no config.yaml there; expected a folder made by cullmt-ray heal")
    saved = yaml.safe_load(f.read_text())
    cfg = from_dict(HealConfig, saved["heal"])
    validate_heal(cfg)
    specs = [",".join(units) for units in saved["candidates"]]
    return run_heal(saved["run_dir"], specs, cfg, heal_dir, log)


def _check_units_and_targets(run_cfg: SearchRunConfig, cfg: HealConfig, cands: list[Candidate]) -> None:
    """Unknown units and LoRA targets fail here, before any actor or trainer starts."""
    from transformers import AutoConfig

    from ..families import resolve_model_path

    conf = AutoConfig.from_pretrained(resolve_model_path(run_cfg.model.name),
                                      trust_remote_code=run_cfg.model.trust_remote_code)
    counts = {"enc": getattr(conf, "encoder_layers", None), "dec": getattr(conf, "decoder_layers", None),
              "layer": getattr(conf, "num_hidden_layers", None)}
    if conf.is_encoder_decoder:
        counts["layer"] = None
    for c in cands:
        for u in c.units:
            prefix, _, idx = u.rpartition(".")
            n = counts.get(prefix)
            if n is None or not idx.isdigit() or int(idx) >= n:
                have = [f"{p}.0 .. {p}.{k - 1}" for p, k in counts.items() if k]
                raise FamilyError(f"--candidate: unit {u!r} is not in {run_cfg.model.name}; its units are "
                                  f"{', '.join(have)}")
    if cfg.lora.target_modules != "auto":
        from ..families import load_family
        from .lora import resolve_targets

        resolve_targets(load_family(replace_device(_spec(run_cfg))), cfg.lora.target_modules)


def replace_device(spec: ModelSpec) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, device="cpu", dtype="float32")


def _heal(run_dir, run_cfg, cfg, cands, directions, corpus, eval_cfg, val_ds, heal_dir, status, log, fault) -> list[dict]:
    from ..search import open_session
    from .export import merged_family, save_adapter, save_merged, stored_dtype, write_card
    from .lora import resolve_targets, train_lora

    spec = _spec(run_cfg)
    stages: dict[str, float] = {}
    status["stages_seconds"] = stages
    clock = [time.time()]

    def lap(stage: str) -> None:
        now = time.time()
        stages[stage] = round(stages.get(stage, 0.0) + now - clock[0], 2)
        clock[0] = now

    # 1. one pool of the unpruned model: KD data, validation teacher outputs, scores before/after pruning
    session = open_session(eval_cfg, run_id=f"{heal_dir.name}-teacher")
    try:
        units = session.pool.info[0]["units"]
        kd_info, kd_df, refs_df = None, None, None
        fp = model_fingerprint(run_cfg.model.name)
        kd_decoding = Decoding(**asdict(cfg.kd.decoding))
        if cfg.mix in ("kd", "both"):
            req = KDRequest(fp, run_cfg.model.dtype, corpus, tuple(directions), cfg.corpus.max_sentences,
                            cfg.corpus.seed, kd_decoding)
            kd_df, kd_info = teacher_translations(session.pool, req, cfg.kd.cache, cfg.kd.chunk, log)
            log(f"[cullmt-ray heal] KD data: {kd_info['pairs']} pairs "
                f"({'from the cache' if kd_info['cached'] else 'made now'}) {kd_info['path']}")
        if cfg.mix in ("refs", "both"):
            refs_df = reference_pairs(corpus, directions, cfg.corpus.max_sentences, cfg.corpus.seed)
        pairs = training_pairs(kd_df, refs_df, cfg.mix)
        val_groups = []
        if val_ds is not None:
            vreq = KDRequest(fp, run_cfg.model.dtype, val_ds, tuple(directions), None, 0,
                             Decoding(**asdict(run_cfg.decoding)))
            vdf, _ = teacher_translations(session.pool, vreq, cfg.kd.cache, cfg.kd.chunk, log=lambda s: None)
            for (s, t), g in vdf.groupby(["src_lang", "tgt_lang"], sort=False):
                val_groups.append({"src_lang": s, "tgt_lang": t, "sources": list(g.source),
                                   "references": list(g.reference), "teacher": list(g.teacher)})
        status["kd"] = kd_info
        status["training_pairs"] = len(pairs)
        write_json(heal_dir / "heal.json", status)
        lap("start_and_kd")
        evals = session.evaluate([BASELINE, *cands], "heal")
        before, pruned = _scores(evals[0]), {c: _scores(e) for c, e in zip(cands, evals[1:])}
        signatures = session.calibration.description["signatures"]
        eval_desc = session.calibration.description["eval"]
        log(f"[cullmt-ray heal] {run_cfg.metric.primary} on {eval_desc['source']}: {before['score']:.2f} before "
            "pruning; " + ", ".join(f"{label(c)} {pruned[c]['score']:.2f}" for c in cands))
    finally:
        session.pool.shutdown()
        session.store.close()
    lap("scores_before")

    # 2. LoRA with Ray Train, several candidates at once when the cluster fits them
    import ray

    settings = {"train": asdict(cfg.train), "lora": asdict(cfg.lora), "resources": asdict(cfg.resources),
                "spm": eval_cfg.metric.spm, "metrics": list(eval_cfg.metric.metrics),
                "primary": eval_cfg.metric.primary, "decoding": asdict(run_cfg.decoding)}
    storage = str(Path(cfg.train.storage).expanduser().resolve()) if cfg.train.storage and "://" not in \
        cfg.train.storage else (cfg.train.storage or str((heal_dir / "train").resolve()))
    cluster = ray.cluster_resources()
    per = cfg.resources.workers * cfg.resources.cpus_per_worker
    fits = max(1, int(float(cluster.get("CPU", 1)) // per))
    parallel = min(len(cands), cfg.resources.parallel or fits)
    log(f"[cullmt-ray heal] training {len(cands)} candidate(s) on {len(pairs)} pairs ({cfg.mix}), "
        f"{cfg.resources.workers} worker(s) each, {parallel} at a time")

    def one(c: Candidate):
        name = f"{heal_dir.name}-{label(c)}"
        return train_lora(spec, c.units, pairs, val_groups, settings, storage, name, fault=fault, log=log)

    with ThreadPoolExecutor(max_workers=parallel) as ex:
        outcomes = dict(zip(cands, ex.map(one, cands)))
    lap("train")

    # 3. merge + export, then 4. score the exported models
    dtype = stored_dtype(run_cfg.model.name) if cfg.export.dtype == "auto" else cfg.export.dtype
    results = []
    for c in cands:
        out = heal_dir / label(c)
        oc = outcomes[c]
        with oc.checkpoint.as_directory() as ck:
            adapter = Path(ck) / "adapter"
            with merged_family(spec, c.units, adapter) as fam:
                targets = resolve_targets(fam, cfg.lora.target_modules)
                size = save_merged(fam, out / "model", dtype)
            if cfg.export.keep_adapter:
                from ..families import load_family

                base = load_family(replace_device(spec))
                pruned_dir = out / "pruned"
                base.export(c.units, pruned_dir, {"note": "the pruned base the adapter in ../adapter applies to"})
                save_adapter(adapter, out / "adapter", pruned_dir)
        results.append({"candidate": c, "folder": label(c), "model_dir": str((out / "model").resolve()), "size": size,
                        "targets": targets, "outcome": oc})
    lap("export")
    log(f"[cullmt-ray heal] exported {len(results)} model(s); scoring them on {eval_desc['source']}")
    final = []
    for r in results:
        c = r["candidate"]
        s = open_session(_eval_config(run_cfg, cfg, directions, model=r["model_dir"]),
                         run_id=f"{heal_dir.name}-{c.key[:8]}")
        try:
            (ev,) = s.evaluate([BASELINE], "heal")
            healed = _scores(ev)
        finally:
            s.pool.shutdown()
            s.store.close()
        oc = r["outcome"]
        scores = {"before_pruning": before, "after_pruning": pruned[c], "after_healing": healed}
        train_summary = {"steps": oc.state["step"], "epochs": oc.state["step"] / max(1, oc.state["steps_per_epoch"]),
                         "pairs": len(pairs), "examples": oc.state["examples"], "workers": cfg.resources.workers,
                         "seconds": round(oc.seconds, 2), "started": oc.started, "finished": oc.finished,
                         "restarts": oc.state["restarts"],
                         "resumed_from": oc.state["resumed_from"], "trainable_params": oc.state["trainable_params"],
                         "checkpoint": oc.checkpoint.path, "history": oc.history}
        info = {"base_model": run_cfg.model.name, "base_fingerprint": model_fingerprint(run_cfg.model.name),
                "family": _family_name(run_cfg), "removed_units": c.units, "candidate_id": c.key,
                "units_total": len(units), "run_dir": str(run_dir), "model_dir": r["model_dir"],
                "directions": [direction_name(d) for d in directions], "primary_metric": run_cfg.metric.primary,
                "signatures": signatures, "evaluation": eval_desc,
                "validation": {"source": val_ds.source if val_ds is not None else None,
                               "sentences": len(val_ds) if val_ds is not None else 0},
                "size": {"before_pruning": {"params": before["params"], "bytes": before["bytes"]},
                         "after_pruning": {"params": pruned[c]["params"], "bytes": pruned[c]["bytes"]},
                         "healed": r["size"]},
                "scores": scores, "recovered": _recovered(before, pruned[c], healed),
                "mix": cfg.mix, "mix_description": MIX_DESCRIPTIONS[cfg.mix], "kd": status.get("kd"),
                "lora_targets": r["targets"], "training": train_summary, "heal_config": cfg.to_dict(),
                "search_config": run_cfg.to_dict()}
        write_card(r["model_dir"], info)
        final.append({"folder": r["folder"], "removed": c.units, "id": c.key, "model_dir": r["model_dir"],
                      "adapter_dir": str(Path(r["model_dir"]).parent / "adapter") if cfg.export.keep_adapter else None,
                      "scores": scores, "recovered": info["recovered"], "size": info["size"],
                      "training": {k: v for k, v in train_summary.items() if k != "history"},
                      "signatures": signatures})
    lap("scores_after")
    return final


def _family_name(run_cfg: SearchRunConfig) -> str:
    from transformers import AutoConfig

    from ..families import resolve_model_path

    conf = AutoConfig.from_pretrained(resolve_model_path(run_cfg.model.name),
                                      trust_remote_code=run_cfg.model.trust_remote_code)
    return "encdec" if conf.is_encoder_decoder else "decoder"
