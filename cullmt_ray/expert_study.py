"""``cullmt-ray experts``: language-specific expert pruning of an NLLB-MoE model, end to end.

1. The evaluator actors collect gate statistics per direction on the statistics set
   (``experts.stats_*``; while translating, or by teacher forcing).
2. For every removal rate and direction, :func:`cullmt_ray.experts.select` picks the experts to
   remove (language or pair granularity, global or per-layer, encoder:decoder ratio).
3. Each pruned model is scored on its own direction of the evaluation set (``data``), through the
   results store (nothing is scored twice), against the unpruned baseline.
4. A run folder gets ``gate_stats.json``, ``experts.{json,md,csv}`` (memory kept in bytes, score and
   loss per pair and rate, how many experts per language can go within 1 point, overlap of kept
   sets between languages) and, on request, exported checkpoints.
"""

from __future__ import annotations

import random
from collections import Counter
import logging
from itertools import combinations
from pathlib import Path

import pandas as pd
import ray

from .atomic import write_json, write_text
from .candidate import BASELINE, Candidate
from .config import ConfigError, SearchRunConfig
from .data import direction_name, load_devset
from .experts import Selection, jaccard, select, side_stats
from .units import split_expert
from .session import open_session

log = logging.getLogger("cullmt_ray")

MAX_LOSS = 1.0  # points of the primary metric: the "how many experts can go" question


def _require_moe(cfg: SearchRunConfig) -> None:
    from transformers import AutoConfig

    from .families import resolve_model_path

    conf = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    if "moe" not in getattr(conf, "model_type", ""):
        raise ConfigError(f"model.name={cfg.model.name!r} is a {conf.model_type} model; expert pruning needs "
                       "NLLB-MoE (e.g. reference:moe or facebook/nllb-moe-54b)")


def run_expert_study(cfg: SearchRunConfig, export: list[str] = ()) -> Path:
    ex = cfg.experts
    _require_moe(cfg)
    with open_session(cfg, "experts") as session:
        run_dir = session.run_dir
        info = session.pool.info[0]
        dirs = session.calibration.directions
        stats_ds = load_devset(ex.stats_dev or cfg.data.dev, cfg.data.languages, ex.stats_split or cfg.data.split)
        stats_ds = stats_ds.subsample(ex.stats_sentences, cfg.data.seed)
        log.info("gate statistics: %d sentences x %d directions from %s (%s)", len(stats_ds), len(dirs),
                 stats_ds.source, "teacher forcing" if ex.teacher_forced else "translating")
        lines = {k: list(v) for k, v in stats_ds.lines.items()}
        stats = session.pool.gate_stats(lines, dirs, ex.teacher_forced)
        write_json(run_dir / "gate_stats.json", {"source": stats_ds.source, "sentences": len(stats_ds),
                                                 "teacher_forced": ex.teacher_forced, "directions": stats})
        present: dict[str, list[int]] = {}
        for u in info["units"]:
            layer, e = split_expert(u)
            present.setdefault(layer, []).append(e)
        plans = []  # (rate, direction, removed)
        for rate in ex.rates:
            sel = Selection(1 - rate, ex.score, ex.mode, ex.min_per_layer, ex.enc_dec_ratio, ex.granularity)
            for d in dirs:
                st = side_stats(stats, d[0], d[1], ex.granularity)
                plans.append((rate, d, select(st, present, sel)))
        controls = _controls(plans, present, ex.controls, cfg.data.seed)
        (baseline,) = session.evaluate([BASELINE], "baseline")
        rows, control_rows = [], []
        for d in dirs:
            es = session.service.evalset([d])
            mine = [p for p in plans if p[1] == d]
            theirs = [c for c in controls if c[2] == d]
            evs = session.evaluate([Candidate.of(p[2]) for p in mine] + [Candidate.of(c[3]) for c in theirs],
                                   "experts", es)
            name = direction_name(d)
            base = baseline.metrics[cfg.metric.primary][name]
            for (kind, rate, _, removed), ev in zip(theirs, evs[len(mine):]):
                control_rows.append({"control": kind, "rate": rate, "direction": name, "experts_removed": len(removed),
                                     "score": ev.score, "loss": round(base - ev.score, 4), "removed": removed})
            for (rate, _, removed), ev in zip(mine, evs[: len(mine)]):
                rows.append({"rate": rate, "direction": name, "experts_removed": len(removed),
                             "experts_total": len(info["units"]), "params": ev.params, "bytes": ev.bytes,
                             "bytes_kept_fraction": round(ev.bytes / baseline.bytes, 4), "score": ev.score,
                             "baseline": base, "loss": round(base - ev.score, 4),
                             "chrf++": ev.metrics.get("chrf++", {}).get("mean"), "removed": removed})
            log.info("%s: %s", name, ", ".join(f"{r['rate']:.0%} -> {r['score']:.2f}" for r in rows
                                              if r["direction"] == name))
        report = _report(cfg, rows, plans, baseline, session.signatures, present)
        report["controls"] = _control_summary(ex.controls, ex.rates, rows, control_rows)
        exported = {}
        for spec in export:
            exported[spec] = str(_export(session, spec, plans, run_dir, report))
        report["exported"] = exported
        write_json(run_dir / "experts.json", report)
        write_text(run_dir / "experts.md", _markdown(report))
        table = pd.DataFrame([{k: v for k, v in r.items() if k != "removed"} | {"removed": " ".join(r["removed"])}
                              for r in rows])
        write_text(run_dir / "experts.csv", table.to_csv(index=False))
        session.finish(files={"report": "experts.md", "json": "experts.json", "csv": "experts.csv"})
        log.info("report: %s", run_dir / "experts.md")
        return run_dir


def _report(cfg: SearchRunConfig, rows: list[dict], plans: list, baseline, signatures: dict,
            present: dict[str, list[int]]) -> dict:
    ex = cfg.experts
    by_rate = []
    for rate in ex.rates:
        rs = [r for r in rows if r["rate"] == rate]
        by_rate.append({"rate": rate, "mean_loss": round(sum(r["loss"] for r in rs) / len(rs), 4),
                        "max_loss": max(r["loss"] for r in rs),
                        "mean_bytes": round(sum(r["bytes"] for r in rs) / len(rs)),
                        "bytes_kept_fraction": round(sum(r["bytes_kept_fraction"] for r in rs) / len(rs), 4)})
    within = [b["rate"] for b in by_rate if b["mean_loss"] <= MAX_LOSS]
    per_direction = {}
    for r in rows:
        if r["loss"] <= MAX_LOSS:
            per_direction[r["direction"]] = max(per_direction.get(r["direction"], 0), r["experts_removed"])
    # Overlap of kept sets between languages, per side, at each rate (language granularity: a
    # language's encoder experts are the same in every pair it is the source of).
    overlap = {}
    for rate in ex.rates:
        kept = {"enc": {}, "dec": {}}
        for r, d, removed in plans:
            if r != rate:
                continue
            gone = set(removed)
            for side, lang in (("enc", d[0]), ("dec", d[1])):
                units = {f"{layer}.expert.{e}" for layer, es in present.items() if layer.startswith(side) for e in es}
                kept[side].setdefault(lang, set()).update(units - gone)
        overlap[str(rate)] = {side: {f"{a}|{b}": round(jaccard(ka[a], ka[b]), 3) for a, b in combinations(sorted(ka), 2)}
                              for side, ka in kept.items()}
    return {"model": cfg.model.name, "metric": cfg.metric.primary, "signature": signatures.get(cfg.metric.primary),
            "selection": {"score": ex.score, "mode": ex.mode, "min_per_layer": ex.min_per_layer,
                          "enc_dec_ratio": ex.enc_dec_ratio, "granularity": ex.granularity,
                          "statistics": "teacher forcing" if ex.teacher_forced else "translating"},
            "baseline": {"score": baseline.score, "bytes": baseline.bytes, "params": baseline.params,
                         "per_direction": {k: v for k, v in baseline.metrics[cfg.metric.primary].items() if k != "mean"}},
            "experts_total": sum(len(v) for v in present.values()), "rates": by_rate,
            f"largest_rate_within_{MAX_LOSS:g}_point": max(within) if within else None,
            f"experts_removable_within_{MAX_LOSS:g}_point_per_direction": per_direction,
            "kept_overlap_jaccard": overlap, "rows": rows}


def _controls(plans: list, present: dict[str, list[int]], kinds: list[str], seed: int) -> list[tuple]:
    """(kind, rate, direction, removed) for each control and each (rate, direction) selection.

    ``random`` removes as many experts from each layer as the selection does, chosen at random;
    ``reverse`` removes what the selection for the reverse direction removes (at language granularity:
    the target language's encoder experts and the source language's decoder experts)."""
    out = []
    by_key = {(rate, d): removed for rate, d, removed in plans}
    for rate, d, removed in plans:
        if "random" in kinds:
            rng = random.Random(f"{seed}|{rate}|{direction_name(d)}")
            per_layer = Counter(split_expert(u)[0] for u in removed)
            out.append(("random", rate, d, sorted(f"{layer}.expert.{e}" for layer, n in per_layer.items()
                                                  for e in rng.sample(present[layer], n))))
        if "reverse" in kinds and (rate, (d[1], d[0])) in by_key:
            out.append(("reverse", rate, d, by_key[(rate, (d[1], d[0]))]))
    return out


def _control_summary(kinds: list[str], rates: list[float], rows: list[dict], control_rows: list[dict]) -> dict:
    """Mean loss per rate of the gate-statistics selection and of each control, plus the control rows."""
    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    table = [{"rate": rate, "selection": mean([r["loss"] for r in rows if r["rate"] == rate]),
              **{k: mean([c["loss"] for c in control_rows if c["rate"] == rate and c["control"] == k]) for k in kinds}}
             for rate in rates]
    return {"kinds": list(kinds), "mean_loss": table, "rows": control_rows}


def _export(session, spec: str, plans: list, run_dir: Path, report: dict) -> Path:
    """``eng_Latn-deu_Latn@0.5``: the model pruned for that direction at that rate."""
    name, _, rate = spec.partition("@")
    match = [p for p in plans if direction_name(p[1]) == name and str(p[0]) == rate]
    if not match:
        raise ConfigError(f"--export {spec!r}: expected DIRECTION@RATE from this run, e.g. "
                          f"{direction_name(plans[0][1])}@{plans[0][0]}")
    removed = match[0][2]
    out = run_dir / "export" / f"{name}-{rate}"
    row = next(r for r in report["rows"] if r["direction"] == name and str(r["rate"]) == rate)
    card = {"direction": name, "rate": float(rate), "score": row["score"], "baseline": row["baseline"],
            "metric": report["metric"], "signature": report["signature"], "selection": report["selection"]}
    return Path(ray.get(session.pool.actors[0].export.remote(removed, str(out), card)))


def _markdown(rep: dict) -> str:
    sel = rep["selection"]
    out = [f"# Expert pruning: {rep['model']}", "",
           f"Selection: score {sel['score']}, {sel['mode']}, granularity {sel['granularity']}, encoder:decoder "
           f"{sel['enc_dec_ratio']:g}:1, min {sel['min_per_layer']} per layer; statistics while {sel['statistics']}.",
           f"Metric: {rep['metric']} ({rep['signature']}). Baseline {rep['baseline']['score']:.2f}, "
           f"{rep['baseline']['bytes'] / 2**20:.2f} MiB, {rep['experts_total']} experts.", "",
           "| removed | mean loss | max loss | memory kept |", "| --- | --- | --- | --- |"]
    out += [f"| {b['rate']:.0%} | {b['mean_loss']:.2f} | {b['max_loss']:.2f} | {b['mean_bytes'] / 2**20:.2f} MiB "
            f"({b['bytes_kept_fraction']:.0%}) |" for b in rep["rates"]]
    out += ["", "| direction | rate | experts removed | score | loss | bytes |", "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['direction']} | {r['rate']:.0%} | {r['experts_removed']}/{r['experts_total']} | {r['score']:.2f} | "
            f"{r['loss']:.2f} | {r['bytes']} |" for r in rep["rows"]]
    key = next(k for k in rep if k.startswith("largest_rate_within"))
    per = next(k for k in rep if k.startswith("experts_removable"))
    out += ["", f"Largest rate with mean loss within {MAX_LOSS:g} point: {rep[key]}.",
            f"Experts removable within {MAX_LOSS:g} point, per direction: {rep[per]}.", "",
            "Overlap (Jaccard) of kept experts between languages:", ""]
    for rate, sides in rep["kept_overlap_jaccard"].items():
        for side, pairs in sides.items():
            out.append(f"- {float(rate):.0%} {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in pairs.items()))
    kinds = rep.get("controls", {}).get("kinds", [])
    if kinds:
        out += ["", "Controls: mean loss of the gate-statistics selection vs the same number of experts per layer "
                "chosen at random, and vs the selection made for the reverse direction (other languages' experts):", "",
                "| removed | gate statistics | " + " | ".join(kinds) + " |", "| --- | --- |" + " --- |" * len(kinds)]
        out += [f"| {t['rate']:.0%} | {t['selection']:.2f} | " + " | ".join(
            "-" if t[k] is None else f"{t[k]:.2f}" for k in kinds) + " |" for t in rep["controls"]["mean_loss"]]
    return "\n".join(out) + "\n"
