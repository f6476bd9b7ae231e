"""Replay: run search strategies against a ground-truth table instead of a model.

A ground-truth table (``bench/bench_ground_truth.py``, Parquet) scores every allowed prune set
of some sizes exactly. Replaying a strategy asks and tells it exactly as the live driver does
(same :class:`SearchSpace`, :class:`StopRule`, options, batch size, budget, and optionally the
KL proxy stage of ``search.fidelity``), but every score is a table lookup: 30 seeds of every
strategy take seconds, and regret is measured against the exact optimum.

:func:`run_replay` is the seeds study behind ``cullmt-ray compare --table FILE --seeds N``; it
writes ``replay.json``, ``replay.md`` and ``replay.png``. Imports neither torch nor ray.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .candidate import BASELINE, Candidate, Evaluation
from .pareto import hypervolume, non_dominated
from .strategies import SearchSpace, StopRule, StrategyError, build_strategy
from .strategies.exhaustive import allowed_sets
from .units import unit_sort_key

REQUIRED = ("removed", "n_removed", "params")
METRICS = ("score", "spbleu", "chrf++", "bleu", "kl")  # kl: lower is better, replayed as -kl
EPS = 1e-9


class TableError(ValueError):
    """A ground-truth table that cannot be used; one line naming the file and what is expected."""


@dataclass
class Table:
    """Every prune set of a model scored exactly (one metric picked as the score)."""

    path: Path
    metric: str
    units: list[str]
    protected: frozenset[str]
    baseline: Evaluation
    rows: dict[Candidate, Evaluation]
    proxy: dict[Candidate, Evaluation]  # teacher-forced KL evaluations (score -kl), where the table has them
    meta: dict = field(default_factory=dict)
    kl_cost: float | None = None  # a KL evaluation in decoded ones, measured elsewhere (None: from the table)

    @property
    def space(self) -> SearchSpace:
        return SearchSpace(list(self.units), self.protected, self.baseline.score, self.baseline.params)

    @property
    def proxy_cost(self) -> float:
        """A KL evaluation's cost in decoded evaluations: ``kl_cost`` when given (a ratio measured in one
        run), else the table's mean seconds ratio (0.4 when unknown)."""
        if self.kl_cost is not None:
            return self.kl_cost
        kl = [e.seconds for e in self.proxy.values() if e.seconds > 0]
        full = [e.seconds for c, e in self.rows.items() if c.removed and e.seconds > 0]
        return round(statistics.mean(kl) / statistics.mean(full), 3) if kl and full else 0.4

    def expected(self, size: int) -> int:
        """How many prune sets of ``size`` units the space allows."""
        return sum(1 for _ in allowed_sets(self.space, size, size))

    def complete_sizes(self) -> list[int]:
        """Sizes whose every allowed prune set is in the table."""
        have: dict[int, int] = {}
        for c in self.rows:
            have[len(c)] = have.get(len(c), 0) + 1
        return [k for k in sorted(have) if k > 0 and have[k] == self.expected(k)]

    def kl_complete_sizes(self) -> list[int]:
        """Sizes whose every allowed prune set has a kl value."""
        have: dict[int, int] = {}
        for c in self.proxy:
            have[len(c)] = have.get(len(c), 0) + 1
        return [k for k in sorted(have) if k > 0 and have[k] == self.expected(k)]

    def evaluate(self, c: Candidate) -> Evaluation:
        try:
            return self.rows[c]
        except KeyError:
            raise TableError(f"{self.path}: no row for prune set {c}; the table holds sizes "
                             f"{self.complete_sizes()} completely (ask a strategy for those sizes only)") from None

    def evaluate_proxy(self, c: Candidate) -> Evaluation:
        try:
            return self.proxy[c]
        except KeyError:
            raise TableError(f"{self.path}: no kl value for prune set {c}; expected a kl column filled for "
                             "every set the strategy may ask (bench_ground_truth.py --passes kl)") from None

    def by_size(self, size: int) -> list[Evaluation]:
        return [e for c, e in self.rows.items() if len(c) == size]

    def optimum(self, size: int) -> float:
        return max(e.score for e in self.by_size(size))

    def optimal_sets(self, size: int) -> list[Candidate]:
        best = self.optimum(size)
        return sorted((e.candidate for e in self.by_size(size) if e.score >= best - EPS), key=lambda c: c.units)

    def front(self, max_size: int) -> list[Evaluation]:
        """The exact Pareto front (params down, score up) over sets of at most ``max_size`` units."""
        return non_dominated([e for c, e in self.rows.items() if len(c) <= max_size])


def _parse_removed(value, path: Path) -> Candidate:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return BASELINE
    if isinstance(value, str):
        return Candidate.of(value.replace(",", " ").split())
    try:
        return Candidate.of(str(u) for u in value)
    except TypeError:
        raise TableError(f"{path}: column 'removed' holds {value!r}; expected space-separated unit names") from None


def load_table(path: str | Path, metric: str | None = None) -> Table:
    """Read a ground-truth Parquet table (pandas/pyarrow only); ``metric`` picks the score column
    (default: the table's primary metric, else ``score``, else ``spbleu``)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise TableError(f"--table {path}: no such file; expected a ground-truth Parquet table such as "
                         "results/bench/ground_truth/dense.parquet")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a non-Parquet file)
        raise TableError(f"--table {path}: not a readable Parquet file ({str(e).splitlines()[0][:100]})") from None
    meta = _metadata(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    metric = metric or meta.get("primary") or ("score" if "score" in df.columns else "spbleu")
    if metric not in METRICS:
        raise TableError(f"metric={metric!r}: expected one of {', '.join(METRICS)}")
    if metric not in df.columns:
        missing.append(metric)
    if missing:
        raise TableError(f"--table {path}: missing column {missing[0]!r}; expected {', '.join(REQUIRED)} and the "
                         f"metric column ({metric})")
    rows: dict[Candidate, Evaluation] = {}
    proxy: dict[Candidate, Evaluation] = {}
    metric_cols = [m for m in ("spbleu", "chrf++", "bleu", "kl") if m in df.columns]
    for r in df.to_dict("records"):
        c = _parse_removed(r["removed"], path)
        value = r[metric]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        score = -float(value) if metric == "kl" else float(value)
        metrics = {m: {"mean": r[m]} for m in metric_cols if r[m] is not None and not _nan(r[m])}
        params, nbytes = int(r["params"]), int(r.get("bytes", 0) or 0)
        rows[c] = Evaluation(c, score, params, nbytes, metrics, int(r.get("sentences", 0) or 0),
                             float(r.get("seconds", 0.0) or 0.0), "replay")
        if "kl" in r and not _nan(r["kl"]):
            proxy[c] = Evaluation(c, -float(r["kl"]), params, nbytes, {"kl": {"mean": float(r["kl"])}}, 0,
                                  float(r.get("kl_seconds", 0.0) or 0.0), "replay:kl")
    if BASELINE not in rows:
        raise TableError(f"--table {path}: no baseline row (n_removed 0, removed empty); expected one")
    units = meta.get("units") or sorted({u for c in rows for u in c.removed}, key=unit_sort_key)
    return Table(path, metric, list(units), frozenset(meta.get("protected", [])), rows[BASELINE], rows, proxy, meta)


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _metadata(path: Path) -> dict:
    """The build settings stored in the Parquet schema (key ``cullmt``); {} when absent."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"cullmt")
    return json.loads(raw) if raw else {}


# --- running one strategy against a table ------------------------------------------------------


@dataclass
class Variant:
    """A strategy as the study runs it: a label, the registered name, its options, and the KL
    proxy stage (``keep``: the fraction of each batch decoded after the KL stage; None: off)."""

    label: str
    strategy: str
    options: dict = field(default_factory=dict)
    keep: float | None = None
    proxy_cost: float | None = None  # a KL evaluation in decoded ones (None: the table's seconds ratio)

    @classmethod
    def parse(cls, spec: str | dict | Variant, options: dict | None = None) -> Variant:
        """``"greedy"``, ``"greedy+kl=0.25"`` (KL stage keeping 25%), ``"greedy+kl=0.25/free"`` (the
        KL stage costs nothing: budgets in decoded evaluations only), or a dict of the fields."""
        if isinstance(spec, Variant):
            return spec
        if isinstance(spec, dict):
            return cls(**{"label": spec.get("label") or spec["strategy"], **spec})
        name, _, stage = spec.partition("+kl=")
        stage, _, free = stage.partition("/")
        opts = dict((options or {}).get(spec) or (options or {}).get(name) or {})
        return cls(spec, name, opts, float(stage) if stage else None, 0.0 if free == "free" else None)


@dataclass
class Replay:
    """One replayed run. ``told`` holds every evaluation told, in order, as (evaluation, decoded,
    decoded and KL evaluations spent when its batch finished); ``decoded`` is False for a candidate
    the KL stage dropped. A batch is spent as a whole: the strategy learns its results together."""

    variant: str
    seed: int
    size: int
    told: list[tuple[Evaluation, bool, int, int]]
    asked: int
    proxied: int  # candidates scored by the KL stage (decoded afterwards or not)
    stop_reason: str
    trace: dict
    proxy_cost: float = 0.0  # a KL evaluation in decoded ones, as this run counted it

    @property
    def full(self) -> list[tuple[Evaluation, int, int]]:
        """Decoded evaluations with what was spent when each one's batch finished."""
        return [(e, d, p) for e, full, d, p in self.told if full]


def evaluate_batch(table: Table, batch: list[Candidate], keep: float | None) -> list[tuple[Evaluation, bool]]:
    """Score a batch as ``Session.evaluate_staged`` does with ``search.fidelity.proxy: kl``: the KL
    stage scores all, its best ``keep`` fraction is decoded; the rest keep their proxy score."""
    if keep is None or len(batch) < 2:
        return [(table.evaluate(c), True) for c in batch]
    proxies = [table.evaluate_proxy(c) for c in batch]
    n = max(1, math.ceil(keep * len(batch)))
    decoded = {e.candidate for e in sorted(proxies, key=lambda e: (-e.score, e.params))[:n]}
    return [(table.evaluate(p.candidate), True) if p.candidate in decoded else (p, False) for p in proxies]


def replay(table: Table, variant: Variant | str, size: int, seed: int = 0, budget: int | None = None,
           batch: int = 4, threshold: float = 1e9) -> Replay:
    """Run one strategy to ``size`` units removed (or its budget) with scores from ``table``.

    Without a KL stage the budget is the strategy's ``max_evaluations`` (distinct candidates asked),
    as in the live driver; with one, it is a cost (decoded evaluations + ``table.proxy_cost`` per KL
    evaluation) and asking stops once it is spent."""
    v = Variant.parse(variant)
    staged = v.keep is not None
    stop = StopRule(threshold=threshold, target_removed=size, max_evaluations=None if staged else budget)
    strategy = build_strategy(v.strategy, table.space, stop, seed, batch, v.options)
    told: list[tuple[Evaluation, bool, int, int]] = []
    proxied = decoded = 0
    pc = table.proxy_cost if v.proxy_cost is None else v.proxy_cost
    while not (staged and budget is not None and decoded + pc * proxied >= budget - EPS):
        cands = strategy.ask()
        if not cands:
            break
        results = evaluate_batch(table, cands, v.keep)
        strategy.tell([e for e, _ in results])
        proxied += len(cands) if staged and len(cands) > 1 else 0
        decoded += sum(full for _, full in results)
        told.extend((e, full, decoded, proxied) for e, full in results)
    return Replay(v.label, seed, size, told, len(strategy.asked), proxied, strategy.stop_reason, strategy.trace(), pc)


# --- the seeds study ---------------------------------------------------------------------------


def _first(full: list[tuple[Evaluation, int, int]], size: int, score: float, proxy_cost: float
           ) -> tuple[int, float] | tuple[None, None]:
    """(decoded evaluations, cost) spent when a set of ``size`` units scoring >= ``score`` was first seen."""
    for e, decoded, proxied in full:
        if len(e.candidate) == size and e.score >= score - EPS:
            return decoded, round(decoded + proxy_cost * proxied, 2)
    return None, None


def run_stats(table: Table, run: Replay, budget: int) -> dict:
    """Regret, evaluations to the optimum / to within 0.5 points, hypervolume fraction of one run."""
    k, pc = run.size, run.proxy_cost
    full = run.full
    opt = table.optimum(k)
    at_k = [e.score for e, _, _ in full if len(e.candidate) == k]
    exact_hv = hypervolume(table.front(k), table.baseline.params)
    within = [e for e, d, p in full if d + pc * p <= budget + EPS]
    hv = hypervolume(within + [table.baseline], table.baseline.params)
    hit, hit_cost = _first(full, k, opt, pc)
    near, near_cost = _first(full, k, opt - 0.5, pc)
    return {"seed": run.seed, "best": max(at_k) if at_k else None, "regret": opt - max(at_k) if at_k else None,
            "to_optimum": hit, "to_within_0.5": near, "cost_to_optimum": hit_cost, "cost_to_within_0.5": near_cost,
            "full_evaluations": len(full), "proxy_evaluations": run.proxied, "asked": run.asked,
            "cost": round(len(full) + pc * run.proxied, 3),
            "hv_fraction": hv / exact_hv if exact_hv > 0 else None}


def _quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"median": None, "q25": None, "q75": None}
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 4), "q25": round(q[0], 4), "q75": round(q[2], 4)}


def _median_hits(hits: list[int | None]) -> float | None:
    """Median over all seeds with a miss counted as infinitely many evaluations (None if >= half miss)."""
    m = statistics.median([h if h is not None else math.inf for h in hits])
    return None if math.isinf(m) else m


def _skipped(reason: str) -> dict:
    none = {"median": None, "q25": None, "q75": None}
    hit = {"median": None, "reached": 0, "fraction_of_greedy": None}
    return {"seeds": 0, "skipped": reason, "found_size": 0, "regret": none, "optimum_found": 0,
            "to_optimum": hit, "to_within_0.5": hit, "cost_to_optimum": hit, "cost_to_within_0.5": hit,
            "hv_fraction": {**none, "min": None}, "full_evaluations": none, "proxy_evaluations": none, "cost": none}


def aggregate(rows: list[dict], greedy_budget: int) -> dict:
    regrets = [r["regret"] for r in rows if r["regret"] is not None]
    out = {"seeds": len(rows), "found_size": len(regrets), "regret": _quantiles(regrets),
           "optimum_found": sum(r["regret"] is not None and r["regret"] <= EPS for r in rows)}
    for key in ("to_optimum", "to_within_0.5", "cost_to_optimum", "cost_to_within_0.5"):
        hits = [r[key] for r in rows]
        med = _median_hits(hits)
        out[key] = {"median": med, "reached": sum(h is not None for h in hits),
                    "fraction_of_greedy": round(med / greedy_budget, 3) if med is not None else None}
    hv = [r["hv_fraction"] for r in rows if r["hv_fraction"] is not None]
    out["hv_fraction"] = {**_quantiles(hv), "min": round(min(hv), 4) if hv else None}
    out["full_evaluations"] = _quantiles([r["full_evaluations"] for r in rows])
    out["proxy_evaluations"] = _quantiles([r["proxy_evaluations"] for r in rows])
    out["cost"] = _quantiles([r["cost"] for r in rows])
    return out


def greedy_analysis(table: Table, max_size: int, batch: int = 4) -> list[dict]:
    """Greedy's path against the exact optima, size by size: where (and why) it goes wrong."""
    run = replay(table, "greedy", max_size, batch=batch)
    path = [Candidate.of(s["from"]) for s in run.trace["steps"][1:]] + [Candidate.of(run.trace["final"])]
    out, prev = [], BASELINE
    for k, cur in enumerate(path, 1):
        ranked = sorted(table.by_size(k), key=lambda e: -e.score)
        score = table.evaluate(cur).score
        optimal = table.optimal_sets(k)
        reachable = max(e.score for e in ranked if prev.removed <= e.candidate.removed)
        nested = any(any(p.removed < c.removed for p in table.optimal_sets(k - 1)) for c in optimal) if k > 1 else True
        out.append({"size": k, "greedy": cur.units, "score": round(score, 4), "optimum": round(ranked[0].score, 4),
                    "optimal_sets": [c.units for c in optimal[:3]], "regret": round(ranked[0].score - score, 4),
                    "rank": 1 + sum(e.score > score + EPS for e in ranked), "of": len(ranked),
                    "on_optimal_path": any(cur.removed <= c.removed or c.removed <= cur.removed for c in optimal),
                    "best_from_previous_step": round(reachable, 4),
                    "optimum_extends_previous_step": reachable >= ranked[0].score - EPS,
                    "optima_nested": nested, "evaluations": sum(len(table.space.removable) - i for i in range(k))})
        prev = cur
    return out


def greedy_budgets(table: Table, sizes: Iterable[int], batch: int = 4) -> dict[int, int]:
    """Distinct candidates greedy asks for to reach each size (its budget there)."""
    return {k: replay(table, "greedy", k, batch=batch).asked for k in sizes}


def run_study(table: Table, variants: list[Variant], seeds: int, sizes: list[int], budget: int | None = None,
              batch: int = 4, log: Callable[[str], None] = print) -> dict:
    """N seeds x variants x sizes -> per variant and size: regret, evaluations to the optimum, HV."""
    budgets = greedy_budgets(table, sizes, batch)
    report = {"table": _shown(table.path), "metric": table.metric, "seeds": seeds, "sizes": sizes, "batch": batch,
              "baseline": {"score": table.baseline.score, "params": table.baseline.params},
              "greedy_budget": {str(k): b for k, b in budgets.items()},
              "budget": budget, "proxy_cost": table.proxy_cost, "optima": {}, "results": {},
              "runs": {}}  # per variant and size: per-seed regret, evaluations and cost to the optimum, HV fraction
    for k in sizes:
        report["optima"][str(k)] = {"score": round(table.optimum(k), 4),
                                    "sets": [c.units for c in table.optimal_sets(k)][:3],
                                    "front_hypervolume": round(hypervolume(table.front(k), table.baseline.params), 4)}
    for v in variants:
        t0 = time.time()
        report["results"][v.label] = {"strategy": v.strategy, "options": v.options, "kl_keep": v.keep, "sizes": {}}
        for k in sizes:
            spend = budget or budgets[k]
            if v.keep is not None and not set(range(1, k + 1)) <= set(table.kl_complete_sizes()):
                report["results"][v.label]["sizes"][str(k)] = _skipped(f"the table has no kl for every set of <= {k}")
                continue
            rows = [run_stats(table, replay(table, v, k, seed, spend, batch), spend)
                    for seed in range(seeds)]
            report["results"][v.label]["sizes"][str(k)] = aggregate(rows, budgets[k])
            report["runs"].setdefault(v.label, {})[str(k)] = {
                key: [None if r[key] is None else round(r[key], 4) for r in rows]
                for key in ("regret", "to_optimum", "cost_to_optimum", "hv_fraction")}
        log(f"[replay] {v.label}: {seeds} seeds x sizes {sizes} in {time.time() - t0:.1f} s")
    report["greedy_analysis"] = greedy_analysis(table, max(sizes), batch)
    report["threshold_runs"] = threshold_study(table, [v for v in variants if v.keep is None], (1.0, 2.0, 3.0), batch)
    report["target"] = target_check(report)
    return report


def threshold_study(table: Table, variants: list[Variant], thresholds: Iterable[float], batch: int = 4) -> list[dict]:
    """The default search's stop rule (no size target, stop past ``threshold``), one seed per variant:
    the final set, its score against the exact optimum of its size and of the threshold, evaluations."""
    out = []
    for thr in thresholds:
        floor = table.baseline.score - thr
        deepest = max((len(c) for c, e in table.rows.items() if e.score >= floor - EPS), default=0)
        for v in variants:
            row = {"threshold": thr, "strategy": v.label}
            try:
                run = replay(table, v, None, 0, None, batch, threshold=thr)
            except StrategyError:  # a fixed-size strategy: it needs search.target_removed
                continue
            except TableError:  # the strategy asked beyond the table's sizes
                out.append({**row, "skipped": f"it asks sets the table lacks (complete sizes {table.complete_sizes()})"})
                continue
            final = Candidate.of(run.trace.get("final") or ())
            k, score = len(final), table.evaluate(final).score
            out.append({**row, "final": final.units, "size": k, "score": round(score, 4),
                        "optimum_at_size": round(table.optimum(k), 4) if k else table.baseline.score,
                        "regret": round(table.optimum(k) - score, 4) if k else 0.0,
                        "deepest_within_threshold": deepest, "evaluations": len(run.full),
                        "stop_reason": run.stop_reason})
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def target_check(report: dict, max_size: int = 4) -> dict:
    """Issue 16's target per variant: at every size <= ``max_size`` the median seed finds the exact
    optimum with <= 50% of greedy's evaluations, and its front reaches >= 99% of the exact front's
    hypervolume at greedy's budget (median over seeds). Evaluations are counted twice: decoded ones
    only (the project's full-evaluation equivalents: a KL pass generates no sentence), and as cost
    (decoded + the KL stage's share by wall time)."""
    out = {}
    for label, res in report["results"].items():
        sizes = {k: s for k, s in res["sizes"].items() if int(k) <= max_size and not s.get("skipped")}
        if not sizes:
            continue
        decoded = {k: s["to_optimum"]["fraction_of_greedy"] for k, s in sizes.items()}
        cost = {k: s["cost_to_optimum"]["fraction_of_greedy"] for k, s in sizes.items()}
        hv = {k: s["hv_fraction"]["median"] for k, s in sizes.items()}
        half = lambda f: all(x is not None and x <= 0.5 for x in f.values())  # noqa: E731
        t = {"optimum_within_half_decoded": half(decoded), "optimum_within_half_cost": half(cost),
             "hv_99": all(h is not None and h >= 0.99 for h in hv.values()),
             "fraction_of_greedy_decoded": decoded, "fraction_of_greedy_cost": cost, "hv_fraction": hv}
        judged = len(sizes) == sum(int(k) <= max_size for k in res["sizes"])  # no size skipped
        t["met_decoded"] = judged and t["optimum_within_half_decoded"] and t["hv_99"]
        t["met"] = judged and t["optimum_within_half_cost"] and t["hv_99"]
        t["sizes_judged"] = [int(k) for k in sizes]
        out[label] = t
    return out


# --- report ------------------------------------------------------------------------------------


def _fmt(x, nd: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    sizes = [str(k) for k in report["sizes"]]
    meta = report.get("table_meta", {})
    lines = [f"# Replay against the exact optimum: {meta.get('model') or report['table']}", "",
             f"Table `{report['table']}`: {meta.get('sentences_per_direction') or '?'} sentences x "
             f"{len((meta.get('eval') or {}).get('directions', [])) or '?'} directions; metric {report['metric']}, "
             f"baseline {report['baseline']['score']:.2f}. {report['seeds']} seeds per strategy and size; "
             f"budget {'greedy' if report['budget'] is None else report['budget']}'s evaluations "
             f"(greedy: {', '.join(f'{k}: {b}' for k, b in report['greedy_budget'].items())}); batch {report['batch']}.",
             "", "Exact optima: " + "; ".join(f"{k} removed {o['score']:.2f} ({', '.join(o['sets'][0])})"
                                            for k, o in report["optima"].items()), ""]
    lines += ["## Regret vs the exact optimum (median [IQR] over seeds; optimum found in n seeds)", "",
              "| strategy | " + " | ".join(f"@{k}" for k in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for label, res in report["results"].items():
        cells = []
        for k in sizes:
            s = res["sizes"][k]
            r = s["regret"]
            cells.append(f"{_fmt(r['median'])} [{_fmt(r['q25'])}, {_fmt(r['q75'])}] ({s['optimum_found']}/{s['seeds']})"
                         if r["median"] is not None else "not run (no kl in the table)" if s.get("skipped")
                         else f"no set of that size ({s['seeds']} seeds)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost to the optimum / to within 0.5 points: median over seeds (a miss counts as never; "
              "'-' when half the seeds miss), seeds that got there, and the median as a fraction of greedy's budget",
              "", f"Cost = decoded evaluations + {report['proxy_cost']} x KL-stage evaluations "
              f"({report.get('proxy_cost_source') or 'the table' + chr(39) + 's seconds ratio'}; 0 for variants marked "
              "/free); without a KL stage it is the number of decoded evaluations.", "",
              "| strategy | " + " | ".join(f"@{k} optimum | @{k} within 0.5" for k in sizes) + " |",
              "|---" * (2 * len(sizes) + 1) + "|"]
    for label, res in report["results"].items():
        cells = []
        for k in sizes:
            for key in ("cost_to_optimum", "cost_to_within_0.5"):
                h = res["sizes"][k][key]
                cells.append(f"{_fmt(h['median'], 0)} ({h['reached']}/{res['sizes'][k]['seeds']}"
                             f"{', ' + _fmt(h['fraction_of_greedy']) + 'x' if h['fraction_of_greedy'] is not None else ''})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Hypervolume at greedy's budget as a fraction of the exact front's (sets of <= k units): "
              "median [min]; decoded / KL-stage evaluations / cost spent (medians)", "",
              "| strategy | " + " | ".join(f"@{k}" for k in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for label, res in report["results"].items():
        cells = [f"{_fmt(res['sizes'][k]['hv_fraction']['median'], 3)} [{_fmt(res['sizes'][k]['hv_fraction']['min'], 3)}]"
                 f"; {_fmt(res['sizes'][k]['full_evaluations']['median'], 0)} / "
                 f"{_fmt(res['sizes'][k]['proxy_evaluations']['median'], 0)} / "
                 f"{_fmt(res['sizes'][k]['cost']['median'], 1)}" for k in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Where greedy goes wrong", "",
              "| size | greedy's set | score | optimum | regret | rank | optimum extends greedy's previous set | "
              "optima nested |", "|---|---|---|---|---|---|---|---|"]
    for g in report["greedy_analysis"]:
        lines.append(f"| {g['size']} | {', '.join(g['greedy'])} | {g['score']:.2f} | {g['optimum']:.2f} "
                     f"({', '.join(g['optimal_sets'][0])}) | {g['regret']:.2f} | {g['rank']}/{g['of']} | "
                     f"{'yes' if g['optimum_extends_previous_step'] else 'no (best reachable ' + format(g['best_from_previous_step'], '.2f') + ')'} | "
                     f"{'yes' if g['optima_nested'] else 'no'} |")
    lines += ["", "## Target (every size <= 4: median seed finds the optimum with <= 50% of greedy's evaluations, "
              "and >= 99% of the exact front's hypervolume at greedy's budget)", ""]
    lines += ["| strategy | met (cost incl. KL time) | met (decoded only) | optimum: cost / greedy's | "
              "optimum: decoded / greedy's | HV fraction |", "|---|---|---|---|---|---|"]
    for label, t in report["target"].items():
        f = lambda d: ", ".join(f"{k}: {_fmt(v)}" for k, v in d.items())  # noqa: E731
        lines.append(f"| {label} | {'yes' if t['met'] else 'no'} | {'yes' if t['met_decoded'] else 'no'} | "
                     f"{f(t['fraction_of_greedy_cost'])} | {f(t['fraction_of_greedy_decoded'])} | "
                     f"{', '.join(f'{k}: {_fmt(v, 3)}' for k, v in t['hv_fraction'].items())} |")
    runs = report.get("threshold_runs") or []
    if runs:
        lines += ["", "## The default stop rule: no size target, stop once the best next set drops more than the "
                  "threshold (seed 0)", "", "Deepest = the most units any set removes within the threshold (exact).", "",
                  "| threshold | strategy | final set | size (deepest) | score | optimum at that size | evaluations |",
                  "|---|---|---|---|---|---|---|"]
        for r in runs:
            if r.get("skipped"):
                lines.append(f"| {r['threshold']} | {r['strategy']} | not run: {r['skipped']} | | | | |")
                continue
            lines.append(f"| {r['threshold']} | {r['strategy']} | {' '.join(r['final']) or '(none)'} | {r['size']} "
                         f"({r['deepest_within_threshold']}) | {r['score']:.2f} | {r['optimum_at_size']:.2f} | "
                         f"{r['evaluations']} |")
    lines += ["", "![replay](replay.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Left: median regret (IQR bars) per size; right: median evaluations to the optimum / greedy's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import save_figure

    sizes = report["sizes"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6), dpi=110)
    n = len(report["results"])
    colors = plt.get_cmap("tab20").colors
    for i, (label, res) in enumerate(report["results"].items()):
        style = {"color": colors[i % len(colors)], "ls": "--" if "+kl" in label else "-", "label": label}
        xs = [k + (i - (n - 1) / 2) * 0.5 / max(n, 1) for k in sizes]
        r = [res["sizes"][str(k)]["regret"] for k in sizes]
        med = [x["median"] if x["median"] is not None else float("nan") for x in r]
        lo = [m - x["q25"] if x["median"] is not None else 0 for m, x in zip(med, r)]
        hi = [x["q75"] - m if x["median"] is not None else 0 for m, x in zip(med, r)]
        a.errorbar(xs, med, yerr=[lo, hi], marker="o", ms=3, capsize=2, lw=1, **style)
        f = [res["sizes"][str(k)]["cost_to_optimum"]["fraction_of_greedy"] for k in sizes]
        b.plot(sizes, [x if x is not None else float("nan") for x in f], marker="o", ms=3, lw=1, **style)
    a.set_xlabel("units removed")
    a.set_ylabel(f"regret vs exact optimum ({report['metric']} points)")
    a.set_title("median regret over seeds (IQR)", fontsize=10)
    b.axhline(0.5, c="0.5", ls=":", lw=1)
    b.set_xlabel("units removed")
    b.set_ylabel("median cost to the optimum / greedy's budget")
    b.set_title("cost of finding the exact optimum (gaps: the median seed never does)", fontsize=10)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.set_xticks(sizes)
    b.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_figure(fig, path)
    return path


def run_replay(table_path: str | Path, strategies: list[str | dict | Variant], seeds: int = 30,
               budget: int | None = None, sizes: list[int] | None = None, out_dir: str | Path | None = None,
               options: dict | None = None, batch: int = 4, metric: str | None = None,
               log: Callable[[str], None] = print, proxy_cost: float | None = None,
               proxy_source: str | None = None) -> Path:
    """The seeds study on a table; writes ``replay.{json,md,png}`` into ``out_dir`` (default: next to
    the table) and returns that folder. ``sizes`` default: the table's complete sizes up to 4;
    ``options``: per strategy, as ``search.options``; ``proxy_cost``: a KL evaluation's cost in decoded
    ones (default: the table's seconds ratio)."""
    from .atomic import write_json, write_text

    table = load_table(table_path, metric)
    if proxy_cost is not None:
        if not 0 <= proxy_cost < 100:
            raise TableError(f"proxy_cost={proxy_cost}: expected a cost in decoded evaluations, 0 <= cost < 100")
        table.kl_cost = proxy_cost
    complete = table.complete_sizes()
    sizes = sizes or [k for k in complete if k <= 4]
    bad = [k for k in sizes if k not in complete or k >= len(table.space.removable)]
    if bad:
        raise TableError(f"sizes: {bad[0]} is not a size {table.path} holds completely; expected some of {complete}")
    if seeds < 1:
        raise TableError(f"seeds={seeds}: expected at least 1")
    variants = [Variant.parse(s, options) for s in strategies]
    if "greedy" not in [v.label for v in variants]:
        variants.insert(0, Variant("greedy", "greedy"))
    report = run_study(table, variants, seeds, sizes, budget, batch, log)
    if proxy_cost is not None:
        report["proxy_cost_source"] = proxy_source or "given"
    report["table_meta"] = {k: table.meta.get(k) for k in ("model", "dev", "sentences_per_direction", "eval",
                                                            "signatures", "max_size", "complete_sizes")}
    out = Path(out_dir) if out_dir else table.path.parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "replay.json", report)
    plot(report, out / "replay.png")
    write_text(out / "replay.md", markdown(report))
    log(f"[replay] report: {out / 'replay.md'}")
    return out
