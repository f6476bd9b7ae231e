"""Non-dominated sets of (size down, score up); CSV/JSON/Parquet tables and a PNG plot.

Every file is written atomically and loads with pandas/pyarrow alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from .atomic import atomic_path, save_figure, write_json
from .candidate import Evaluation


def non_dominated(evals: Iterable[Evaluation]) -> list[Evaluation]:
    """Evaluations no other one beats on both size (params, lower) and score (higher); sorted by size."""
    ordered = sorted(evals, key=lambda e: (e.params, -e.score))
    front: list[Evaluation] = []
    best = float("-inf")
    for e in ordered:
        if e.score > best:
            front.append(e)
            best = e.score
    return front


def hypervolume(evals: Sequence[Evaluation], ref_params: int, ref_score: float = 0.0) -> float:
    """Area the front dominates in (params / ref_params, score) space, up to x=1 and down to ``ref_score``.

    On the front, scores rise with size, so at any size x the best reachable score is that of
    the largest front point not bigger than x: the area is a sum of strips.
    """
    front = [e for e in non_dominated(evals) if e.params <= ref_params]
    xs = [e.params / ref_params for e in front] + [1.0]
    return sum((xs[i + 1] - xs[i]) * max(0.0, e.score - ref_score) for i, e in enumerate(front))


def to_frame(evals: Iterable[Evaluation], baseline: Evaluation, metric: str) -> pd.DataFrame:
    rows = []
    for e in evals:
        row = {"candidate": e.candidate.key, "n_removed": len(e.candidate), "removed_units": " ".join(e.candidate.units),
               "params": e.params, "bytes": e.bytes, "params_fraction": round(e.params / baseline.params, 6),
               "score": e.score, "drop": round(baseline.score - e.score, 4), "metric": metric}
        for m, per in e.metrics.items():
            row[f"{m}_mean"] = per.get("mean")
            for d, v in per.items():
                if d != "mean" and m == metric:
                    row[f"{m}:{d}"] = v
        row.update({"sentences": e.sentences, "seconds": round(e.seconds, 3), "strategy": e.strategy, "run": e.run})
        rows.append(row)
    return pd.DataFrame(rows)


def write_tables(df: pd.DataFrame, stem: Path) -> list[Path]:
    """``stem``.csv/.json/.parquet, each atomically."""
    out = []
    for suffix, writer in ((".csv", lambda p: df.to_csv(p, index=False)),
                           (".json", lambda p: df.to_json(p, orient="records", indent=2)),
                           (".parquet", lambda p: df.to_parquet(p, index=False))):
        path = stem.with_suffix(suffix)
        with atomic_path(path) as tmp:
            writer(tmp)
        out.append(path)
    return out


def plot(all_df: pd.DataFrame, front_df: pd.DataFrame, baseline: Evaluation, path: Path, metric: str,
         title: str, paths: dict[str, list[tuple[int, float]]] | None = None, threshold: float | None = None,
         label: str | None = None) -> Path:
    """Size vs score: every evaluation, the front (solid steps), each strategy's path (dashed), the
    baseline, and the quality floor ``baseline - threshold`` (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    scale = 1e6
    ax.scatter(all_df["params"] / scale, all_df["score"], s=12, c="0.75", label="evaluated", zorder=1)
    ax.plot(front_df["params"] / scale, front_df["score"], "-o", c="tab:blue", ms=4, label="Pareto front", zorder=3,
            drawstyle="steps-post")
    for name, pts in (paths or {}).items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot([x / scale for x in xs], ys, "--x", c="tab:orange", ms=5, label=f"{name} path", zorder=2)
    ax.scatter([baseline.params / scale], [baseline.score], marker="*", s=160, c="tab:red", label="baseline",
               zorder=4)
    if threshold is not None:
        ax.axhline(baseline.score - threshold, ls=":", c="tab:red", lw=1, label=f"threshold (-{threshold:g})")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"{label or metric}\nmean over calibration directions", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
    return path


def export_front(evals: list[Evaluation], baseline: Evaluation, out_dir: Path, metric: str, title: str,
                 paths: dict[str, list[tuple[int, float]]] | None = None, threshold: float | None = None,
                 label: str | None = None) -> dict[str, Path]:
    """Write pareto.{csv,json,parquet,png} and evaluations.{csv,parquet} into ``out_dir``."""
    front = non_dominated(evals)
    all_df, front_df = to_frame(evals, baseline, metric), to_frame(front, baseline, metric)
    files = {p.suffix[1:]: p for p in write_tables(front_df, out_dir / "pareto")}
    files["png"] = plot(all_df, front_df, baseline, out_dir / "pareto.png", metric, title, paths, threshold, label)
    for p in write_tables(all_df, out_dir / "evaluations"):
        files[f"evaluations.{p.suffix[1:]}"] = p
    write_json(out_dir / "pareto_summary.json", {
        "metric": metric, "baseline": {"params": baseline.params, "score": baseline.score},
        "front_size": len(front), "evaluations": len(evals),
        "hypervolume": round(hypervolume(evals, baseline.params), 4)})
    return files


def strategy_path(trace: dict, baseline: Evaluation) -> list[tuple[int, float]]:
    """(params, score) of the baseline and of every accepted step, for the plot."""
    pts = [(baseline.params, baseline.score)]
    pts += [(s["params"], s["best_score"]) for s in trace.get("steps", []) if s.get("accepted")]
    return pts


def metric_label(metric: str, signature: str) -> str:
    """``spbleu [tok:spm[multi30k_spm.model#9df887bc]]``: the metric with the tokenizer its signature names."""
    tok = next((part for part in signature.split("|") if part.startswith("tok:")), "")
    return f"{metric} [{tok}]" if tok else metric


def export_context(store, context: str, out_dir: Path, title: str | None = None,
                   trace: dict | None = None, threshold: float | None = None) -> dict[str, Path]:
    """The front of one store context (its baseline evaluation must be there), with a strategy's path."""
    from .candidate import BASELINE

    baseline = store.get(context, BASELINE)
    if baseline is None:
        raise ValueError(f"{store.name}: context {context} has no baseline evaluation; nothing to export")
    desc = store.context_description(context)
    evals = list(store.evaluations(context))
    paths = {trace.get("strategy", "search"): strategy_path(trace, baseline)} if trace else None
    title = title or f"{desc['model']} on {desc['eval']['source']}"
    label = metric_label(desc["metric"], desc.get("signatures", {}).get(desc["metric"], ""))
    return export_front(evals, baseline, out_dir, desc["metric"], f"{title} ({len(evals)} evaluations)", paths,
                        threshold, label)


def export_store(store, out: Path) -> list[Path]:
    """For every context in ``store`` with a baseline, its front under ``out/<context>/``."""
    from .candidate import BASELINE

    files: list[Path] = []
    for context in store.contexts():
        if not re.fullmatch(r"[0-9a-f]{16}", context):
            raise ValueError(f"{store.name}: context key {context!r} is not one cullmt-ray writes (16 hex digits)")
        if store.get(context, BASELINE) is not None:
            files += list(export_context(store, context, out / context).values())
    if not files:
        raise ValueError(f"{store.name}: no context with a baseline evaluation; nothing to export")
    return files
