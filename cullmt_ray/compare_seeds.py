"""``cullmt-ray compare --seeds N`` on live models: the strategy comparison once per seed
(``search.seed`` = 0..N-1) on one evaluator store, then per strategy the median and IQR over
seeds of its best score at the target size, its hypervolume at greedy's budget and the
evaluations it needed to match greedy. The store serves every candidate an earlier seed already
computed, so seeds after the first cost only what is new (greedy, deterministic, costs nothing).

Writes ``compare_seeds.{json,md}`` and keeps each seed's compare folder under ``seed-<i>/``.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

from .atomic import write_json, write_text
from .config import SearchRunConfig

log = logging.getLogger("cullmt_ray")


def _iqr(xs: list[float]) -> dict:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {"median": None, "q25": None, "q75": None, "n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 4), "q25": round(q[0], 4), "q75": round(q[2], 4), "n": len(xs)}


def aggregate(reports: list[dict]) -> dict:
    """Per strategy over the seeds' compare reports (``compare.json``)."""
    size = str(reports[0]["target_removed"])
    out: dict[str, dict] = {}
    for name in [r["strategy"] for r in reports[0]["strategies"]]:
        rows = [next(r for r in rep["strategies"] if r["strategy"] == name) for rep in reports]
        out[name] = {"best_at_size": _iqr([r["best_by_size"].get(size) for r in rows]),
                     "hypervolume_at_budget": _iqr([r["hypervolume_at_budget"] for r in rows]),
                     "evaluations_to_match_greedy": _iqr([r.get("evaluations_to_match_greedy") for r in rows]),
                     "matched_greedy": sum(r.get("evaluations_to_match_greedy") is not None for r in rows),
                     "computed": sum(r["computed"] for r in rows)}
    return out


def markdown(summary: dict) -> str:
    lines = [f"# Strategy comparison over {summary['seeds']} seeds: {summary['model']}", "",
             f"Target size {summary['target_removed']}, budget {summary['budget']} per strategy and seed; "
             "median [IQR] over seeds.", "",
             "| strategy | best score at the size | HV at greedy's budget | evaluations to match greedy "
             "(seeds that did) | computed |", "|---|---|---|---|---|"]
    f = lambda d: "-" if d["median"] is None else f"{d['median']} [{d['q25']}, {d['q75']}]"  # noqa: E731
    for name, s in summary["strategies"].items():
        lines.append(f"| {name} | {f(s['best_at_size'])} | {f(s['hypervolume_at_budget'])} | "
                     f"{f(s['evaluations_to_match_greedy'])} ({s['matched_greedy']}/{summary['seeds']}) | "
                     f"{s['computed']} |")
    return "\n".join(lines) + "\n"


def run_compare_seeds(cfg: SearchRunConfig, strategies: list[str], seeds: int, budget: int | None = None) -> Path:
    """``compare`` once per seed into one folder; returns it (with ``compare_seeds.{json,md}``)."""
    from .compare import run_compare
    from .session import new_folder

    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: expected at least 1")
    out = new_folder(cfg.output.dir, f"{cfg.name}-seeds")
    reports = []
    for seed in range(seeds):
        run_cfg = replace(cfg, search=replace(cfg.search, seed=seed),
                          output=replace(cfg.output, dir=str(out / f"seed-{seed}")))
        run_dir = run_compare(run_cfg, strategies, budget)
        reports.append(json.loads((run_dir / "compare.json").read_text()))
        log.info("seed %d: %s", seed, run_dir)
    summary = {"model": cfg.model.name, "dev": cfg.data.dev, "seeds": seeds,
               "target_removed": reports[0]["target_removed"], "budget": reports[0]["budget"],
               "strategies": aggregate(reports)}
    write_json(out / "compare_seeds.json", summary)
    write_text(out / "compare_seeds.md", markdown(summary))
    log.info("report: %s", out / "compare_seeds.md")
    return out
