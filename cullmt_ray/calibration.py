"""Calibration languages as a search dimension (the question of arXiv 2408.14398).

For each calibration choice (a subset of the configured directions: ``all``, ``from-english``,
``to-english``, ``into:LANG``, ``from:LANG`` or a list) the same strategy searches prune sets
scored only on those directions; every chosen set is then scored on all configured directions,
so the report shows how the calibration choice changes what is removed and what the held-out
directions lose. Writes ``calibration.{json,md}`` and ``calibration.png`` into a run folder.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from .atomic import save_figure, write_json, write_text
from .candidate import BASELINE, Candidate
from .config import SearchRunConfig
from .data import direction_name, parse_directions, select_directions
from .session import open_session
from .strategies import make_strategy

log = logging.getLogger("cullmt_ray")


def _mean(per: dict[str, float], names: list[str]) -> float | None:
    vals = [per[n] for n in names if n in per]
    return round(sum(vals) / len(vals), 4) if vals else None


def _jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return round(len(sa & sb) / len(sa | sb), 3) if sa | sb else 1.0


def run_calibration_study(cfg: SearchRunConfig, calibrations: list[str]) -> Path:
    """One search per calibration choice, each chosen set scored on every direction; the report folder."""
    from .session import check_search

    metric = cfg.metric.primary

    def check(units, full_dirs, ds) -> None:  # before the run folder exists
        check_search(cfg, units)
        for spec in calibrations:
            select_directions(spec, full_dirs, ds.languages)

    with open_session(cfg, "calibration", check=check) as session:
        run_dir = session.run_dir
        full_dirs = parse_directions(cfg.data.directions, session.devset.languages)
        chosen = {spec: select_directions(spec, full_dirs, session.devset.languages) for spec in calibrations}
        full = session.service.evalset(full_dirs)
        (base_full,) = session.evaluate([BASELINE], "baseline", full)
        rows = []
        for spec, dirs in chosen.items():
            es = session.service.evalset(dirs)
            (base_c,) = session.evaluate([BASELINE], "baseline", es)
            strategy = make_strategy(cfg.search, session.units, base_c, batch=session.batch)
            session.keep_study(strategy, f"{strategy.name}@{spec}")
            asked = 0
            while batch := strategy.ask():
                strategy.tell(session.evaluate(batch, f"{strategy.name}@{spec}", es))
                asked += len(batch)
            trace = strategy.trace()
            final = Candidate.of(trace["final"])
            (final_full,) = session.evaluate([final], "calibration-check", full)
            names = [direction_name(d) for d in full_dirs]
            held = [direction_name(d) for d in full_dirs if d not in dirs]
            per_base, per_final = base_full.metrics[metric], final_full.metrics[metric]
            row = {"calibration": spec, "directions": [direction_name(d) for d in dirs], "removed": final.units,
                   "evaluations": asked, "stop_reason": trace.get("stop_reason", ""),
                   "calibration_score": next((h["score"] for h in strategy.history
                                              if Candidate.of(h["removed"]) == final), base_c.score),
                   "calibration_baseline": base_c.score,
                   "heldout_directions": held, "heldout_score": _mean(per_final, held),
                   "heldout_baseline": _mean(per_base, held), "all_score": _mean(per_final, names),
                   "all_baseline": _mean(per_base, names), "params": final_full.params,
                   "per_direction": {n: {"baseline": per_base[n], "pruned": per_final[n]} for n in names}}
            for k in ("calibration", "heldout", "all"):
                s, b = row[f"{k}_score"], row[f"{k}_baseline"]
                row[f"{k}_drop"] = round(b - s, 4) if s is not None and b is not None else None
            rows.append(row)
            log.info("calibration %s: removes %s; held-out drop %s, all-direction drop %s", spec,
                     ", ".join(final.units), row["heldout_drop"], row["all_drop"])
        overlap = {f"{a['calibration']} | {b['calibration']}": _jaccard(a["removed"], b["removed"])
                   for i, a in enumerate(rows) for b in rows[i + 1:]}
        report = {"model": cfg.model.name, "dev": cfg.data.dev, "metric": metric, "strategy": cfg.search.strategy,
                  "target_removed": cfg.search.target_removed, "threshold": cfg.search.threshold,
                  "signature": full.description["signatures"].get(metric, ""),
                  "created": datetime.now(timezone.utc).isoformat(), "baseline_all": base_full.score,
                  "calibrations": rows, "removed_set_overlap_jaccard": overlap}
        write_json(run_dir / "calibration.json", report)
        write_text(run_dir / "calibration.md", _markdown(report))
        _plot(report, run_dir / "calibration.png")
        session.finish(files={"report": "calibration.md", "json": "calibration.json"})
        log.info("report: %s", run_dir / "calibration.md")
        return run_dir


def _markdown(r: dict) -> str:
    lines = [f"# Calibration study: {r['model']} on {r['dev']}", "",
             f"Strategy {r['strategy']} (target {r['target_removed']} units removed, threshold {r['threshold']}), "
             f"metric {r['metric']} (`{r['signature']}`). Baseline over all directions: {r['baseline_all']:.2f}.",
             "", "| calibration | directions | removed | drop on calibration | drop on held-out | drop on all | "
             "evaluations |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in r["calibrations"]:
        lines.append(f"| {c['calibration']} | {len(c['directions'])} | {' '.join(c['removed'])} | "
                     f"{c['calibration_drop']} | {c['heldout_drop'] if c['heldout_drop'] is not None else '-'} | "
                     f"{c['all_drop']} | {c['evaluations']} |")
    lines += ["", "Overlap of the removed sets (Jaccard):", ""]
    lines += [f"- {k}: {v}" for k, v in r["removed_set_overlap_jaccard"].items()]
    lines += ["", "![per direction](calibration.png)", ""]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["calibrations"][0]["per_direction"]) if r["calibrations"] else []
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / max(1, len(r["calibrations"]))
    for i, c in enumerate(r["calibrations"]):
        drops = [c["per_direction"][n]["baseline"] - c["per_direction"][n]["pruned"] for n in names]
        bars = ax.bar([j + i * width for j in range(len(names))], drops, width, label=c["calibration"])
        for bar, n in zip(bars, names):  # held out by this calibration choice: hatched
            if n not in c["directions"]:
                bar.set_hatch("///")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels([n.replace("_Latn", "") for n in names], rotation=30, fontsize=8)
    ax.set_ylabel(f"{r['metric']} drop from baseline")
    ax.set_title("Per-direction loss by calibration choice (hatched: held out, not calibrated on)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save_figure(fig, path)
