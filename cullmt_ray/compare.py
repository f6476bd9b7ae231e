"""Compare search strategies fairly: one evaluator pool, one store, the same budget.

Greedy (CULL-MT) runs first and sets the reference: its final prune set, its size, and the
number of distinct candidates it asked for (its budget). Every other strategy then gets that
budget (or ``compare.budget``), starts cold (no seeding from others' evaluations, so nobody
inherits greedy's answer), and aims at greedy's final size. The store still serves any
candidate already computed, so nothing is computed twice; budgets count what each strategy
asked for, computed or not, in candidates and in sentences (full-evaluation equivalents).

Writes ``compare.json``, ``compare.md``, ``fronts.png`` (every strategy's front overlaid) and
``progress.png`` (best score at or below greedy's size vs evaluations spent) into a run folder.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from .atomic import save_figure, write_json, write_text
from .candidate import BASELINE, Evaluation
from .config import SearchRunConfig
from .pareto import hypervolume, non_dominated
from .session import Session, open_session
from .strategies import make_strategy

log = logging.getLogger("cullmt_ray")


def _run_strategy(session: Session, name: str, baseline: Evaluation, budget: int | None,
                  size: int | None) -> dict:
    """Run one strategy to its end or its budget; its evaluations in the order it saw them."""
    strategy = make_strategy(session.cfg.search, session.units, baseline, name=name, max_evaluations=budget,
                             batch=session.batch, target_removed=size)
    session.keep_study(strategy)
    seen: list[Evaluation] = []
    spent = session.service.budget
    computed0, requested0, t0 = spent.evaluated, spent.requested, time.time()
    while batch := strategy.ask():
        results = session.evaluate_staged(batch, name)
        strategy.tell(results)
        seen.extend(results)
    return {"strategy": strategy, "evaluations": seen, "computed_this_attempt": spent.evaluated - computed0,
            "computed": session.store.count(run=session.run_id, strategy=name),  # every attempt of this run
            "sentences": spent.requested - requested0, "seconds": time.time() - t0}


def _first_match(evals: list[Evaluation], params: int, score: float) -> int | None:
    """1-based index of the first evaluation at least as small and at least as good as (params, score)."""
    for i, e in enumerate(evals, 1):
        if e.params <= params and e.score >= score - 1e-9:
            return i
    return None


def _best_by_size(evals: list[Evaluation]) -> dict[int, float]:
    out: dict[int, float] = {}
    for e in evals:
        out[len(e.candidate)] = max(out.get(len(e.candidate), float("-inf")), e.score)
    return dict(sorted(out.items()))


def summarize(name: str, run: dict, baseline: Evaluation, reference: dict | None, budget: int) -> dict:
    evals: list[Evaluation] = run["evaluations"]
    trace = run["strategy"].trace()
    row = {"strategy": name, "evaluations": len(evals), "computed": run["computed"],
           "computed_this_attempt": run["computed_this_attempt"],
           "sentences": run["sentences"],
           "full_evaluation_equivalents": round(run["sentences"] / max(baseline.sentences, 1), 2),
           "wall_seconds": round(run["seconds"], 2),
           "stop_reason": trace.get("stop_reason", ""), "final": trace.get("final", []),
           "best_by_size": {str(k): round(v, 4) for k, v in _best_by_size(evals).items()},
           "hypervolume": round(hypervolume(evals + [baseline], baseline.params), 4),
           "hypervolume_at_budget": round(hypervolume(evals[:budget] + [baseline], baseline.params), 4),
           "front": [{"removed": e.candidate.units, "params": e.params, "score": e.score}
                     for e in non_dominated(evals + [baseline])]}
    if reference:
        hit = _first_match(evals, reference["params"], reference["score"])
        row["evaluations_to_match_greedy"] = hit
        row["fraction_of_greedy_budget"] = round(hit / reference["evaluations"], 3) if hit else None
    return row


def _plots(runs: dict[str, dict], baseline: Evaluation, out: Path, metric: str, size: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, run in runs.items():
        front = non_dominated(run["evaluations"] + [baseline])
        ax.plot([e.params / 1e6 for e in front], [e.score for e in front], "-o", ms=3, drawstyle="steps-post",
                label=name if run["evaluations"] else f"{name} (no evaluations)")
    ax.scatter([baseline.params / 1e6], [baseline.score], marker="*", s=140, c="tab:red", label="baseline", zorder=5)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(metric)
    ax.set_title("Pareto fronts by strategy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, out / "fronts.png")

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, run in runs.items():
        best, xs, ys = float("-inf"), [], []
        for i, e in enumerate(run["evaluations"], 1):
            if size is None or len(e.candidate) >= size:
                best = max(best, e.score)
            if best > float("-inf"):
                xs.append(i)
                ys.append(best)
        ax.plot(xs, ys, drawstyle="steps-post", label=name)
    ax.set_xlabel("evaluations spent (distinct candidates)")
    ax.set_ylabel(f"best {metric}" + (f" with >= {size} units removed" if size else ""))
    ax.set_title("Best score vs budget", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, out / "progress.png")


def _markdown(report: dict) -> str:
    ref = report.get("greedy_reference")
    lines = [f"# Strategy comparison: {report['model']} on {report['dev']}", "",
             f"Metric: {report['metric']} (`{report['signature']}`), baseline {report['baseline']['score']:.2f} at "
             f"{report['baseline']['params'] / 1e6:.2f}M parameters. Budget per strategy: {report['budget']} "
             "distinct candidates (store hits count too; nothing is computed twice).", ""]
    if ref:
        lines += [f"Greedy reference: removes {', '.join(ref['removed']) or 'nothing'} ({ref['size']} units, "
                  f"{ref['params'] / 1e6:.2f}M params) at {ref['score']:.2f}, using {ref['evaluations']} "
                  "evaluations.", ""]
    sizes = sorted({int(k) for r in report["strategies"] for k in r["best_by_size"]})
    head = ["strategy", "evaluations", "computed", "full-eval equivalents", "wall s", "hypervolume", "HV at budget",
            "evals to match greedy"] + [f"best @{k}" for k in sizes]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in report["strategies"]:
        cells = [r["strategy"], r["evaluations"], r["computed"], r["full_evaluation_equivalents"], r["wall_seconds"], r["hypervolume"],
                 r["hypervolume_at_budget"], r.get("evaluations_to_match_greedy") or "-"]
        cells += [r["best_by_size"].get(str(k), "-") for k in sizes]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "![fronts](fronts.png)", "", "![progress](progress.png)", ""]
    return "\n".join(lines)


def _resumed_arguments(run_dir: Path) -> tuple[list[str], int | None]:
    """The strategies and budget a compare run folder was started with (kept in its run.json)."""
    import json

    from .config import ConfigError

    try:
        info = json.loads((run_dir / "run.json").read_text())
        record = info["record"]
        return list(record["strategies"]), record.get("budget")
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"compare --resume {run_dir}: its run.json does not name the strategies compared; "
                          "expected a folder made by cullmt-ray compare") from None


def run_compare(cfg: SearchRunConfig, strategies: list[str] | None, budget: int | None = None,
                run_dir: Path | None = None, accept_config_changes: bool = False) -> Path:
    """Run ``strategies`` (greedy first when listed) on one pool and store; write the report folder.

    With ``run_dir`` (a killed comparison's folder) the comparison is replayed there with the strategies
    and budget it started with: stored evaluations are read back, and each strategy's ``computed``
    counts the rows it computed in every attempt (``computed_this_attempt``: in this one)."""
    from .session import check_search

    if run_dir is not None:
        strategies, budget = _resumed_arguments(run_dir)

    def check(units, _dirs, _ds) -> None:  # every strategy's settings, before the folder exists
        fixed = cfg.search.target_removed
        check_search(cfg, units, [s for s in strategies if s != "greedy"], target_removed=fixed or 1)
        if "greedy" in strategies:
            check_search(cfg, units, ["greedy"])

    with open_session(cfg, "compare", run_dir, check=check, accept_config_changes=accept_config_changes,
                      record={"strategies": strategies, "budget": budget}) as session:
        run_dir = session.run_dir
        (baseline,) = session.evaluate([BASELINE], "baseline")
        log.info("compare %s: baseline %s %.2f", ", ".join(strategies), cfg.metric.primary, baseline.score)
        order = (["greedy"] if "greedy" in strategies else []) + [s for s in strategies if s != "greedy"]
        runs: dict[str, dict] = {}
        reference = None
        size = cfg.search.target_removed
        for name in order:
            spend = budget if budget is not None else (reference["evaluations"] if reference else None)
            runs[name] = _run_strategy(session, name, baseline, spend, size if name != "greedy" else None)
            log.info("%s: %d evaluations (%d computed), %s", name, len(runs[name]["evaluations"]),
                     runs[name]["computed"], runs[name]["strategy"].trace().get("stop_reason", ""))
            if name == "greedy":
                g = runs[name]
                final = g["strategy"].trace()["final"]
                fin = next((e for e in g["evaluations"] if e.candidate.units == final), baseline)
                reference = {"removed": final, "size": len(final), "params": fin.params, "score": fin.score,
                             "evaluations": len(g["evaluations"])}
                size = size or len(final) or None
        spent = budget or (reference["evaluations"] if reference else max(len(r["evaluations"]) for r in runs.values()))
        report = {"model": cfg.model.name, "dev": cfg.data.dev, "metric": cfg.metric.primary,
                  "signature": session.signatures.get(cfg.metric.primary, ""),
                  "created": datetime.now(timezone.utc).isoformat(),
                  "baseline": {"params": baseline.params, "score": baseline.score}, "budget": spent,
                  "target_removed": size, "greedy_reference": reference,
                  "strategies": [summarize(n, r, baseline, reference if n != "greedy" else None, spent)
                                 for n, r in runs.items()],
                  "traces": {n: r["strategy"].trace() for n, r in runs.items()}}
        write_json(run_dir / "compare.json", report)
        _plots(runs, baseline, run_dir, cfg.metric.primary, size)
        write_text(run_dir / "compare.md", _markdown(report))
        session.finish(files={"report": "compare.md", "json": "compare.json"})
        log.info("report: %s", run_dir / "compare.md")
        return run_dir
