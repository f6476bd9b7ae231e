"""What a researcher looks at after a run: the unit x direction sensitivity heatmap and one
self-contained ``report.html`` (plots embedded, tables with signatures, trace, held-out scores).

Both are made from the run folder and the results store alone (read-only), so ``cullmt-ray report
RUN_DIR`` can rebuild them at any time.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from .atomic import save_figure, write_text
from .candidate import BASELINE, Evaluation
from .units import sort_units


def sensitivity(evals: list[Evaluation], baseline: Evaluation, metric: str) -> pd.DataFrame:
    """Drop of ``metric`` per direction (columns) when one unit (rows, model order) is removed alone."""
    singles = {e.candidate.units[0]: e for e in evals if len(e.candidate) == 1 and metric in e.metrics}
    base = {d: v for d, v in baseline.metrics[metric].items() if d != "mean"}
    rows = {u: {d: round(base[d] - singles[u].metrics[metric][d], 4) for d in base if d in singles[u].metrics[metric]}
            for u in sort_units(singles)}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(base))


def plot_sensitivity(df: pd.DataFrame, path: Path, metric: str, title: str) -> Path:
    """A heatmap of :func:`sensitivity`: darker = the direction loses more without that unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(df.columns), 1.2 + 0.32 * len(df)), dpi=120)
    im = ax.imshow(df.to_numpy(dtype=float), cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(df.columns)), [c.replace("_Latn", "") for c in df.columns], rotation=30, fontsize=8)
    ax.set_yticks(range(len(df)), list(df.index), fontsize=8)
    for (i, j), v in pd.DataFrame(df.to_numpy(dtype=float)).stack().items():
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=f"{metric} drop (points)")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def _img(path: Path) -> str:
    if not path.is_file():
        return "<p><em>(no plot)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.2f}", border=0, classes="t")


def _count(tried) -> int:
    """Candidates a step tried: greedy lists them, beam counts them."""
    return tried if isinstance(tried, int) else len(tried)


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
table.t{border-collapse:collapse;font-size:.85em;margin:.5em 0}table.t td,table.t th{padding:.2em .6em;
border-bottom:1px solid #ddd;text-align:right}code{font-size:.85em;background:#f4f4f4;padding:0 .3em}
img{max-width:100%}h2{border-bottom:1px solid #ccc;margin-top:1.6em}"""


def write_report(run_dir: Path, store, title: str) -> Path:
    """``report.html`` (and ``sensitivity.{csv,png}``) for a finished search run folder."""
    run = json.loads((run_dir / "run.json").read_text())
    context, metric = run["context"], store.context_description(run["context"])["metric"]
    baseline = store.get(context, BASELINE)
    evals = list(store.evaluations(context))
    sens = sensitivity(evals, baseline, metric)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Run <code>{html.escape(run['run'])}</code>, status {html.escape(run['status'])}; "
             f"baseline {metric} {baseline.score:.2f} at {baseline.params / 1e6:.2f}M parameters; final prune set "
             f"<code>{html.escape(' '.join(run.get('final', {}).get('removed', [])) or '(none)')}</code> "
             f"({html.escape(run.get('final', {}).get('stop_reason', ''))}); budget {run.get('budget')}.</p>",
             "<h2>Pareto front</h2>", _img(run_dir / "pareto.png")]
    front = run_dir / "pareto.csv"
    if front.is_file():
        cols = ["n_removed", "removed_units", "params", "score", "drop"]
        parts.append(_table(pd.read_csv(front)[cols].fillna({"removed_units": "(none)"})))
    final = next((e for e in evals if e.candidate.units == run.get("final", {}).get("removed")), None)
    per = {m: {"baseline": {d: v for d, v in baseline.metrics[m].items()}} for m in baseline.metrics}
    if final is not None:
        for m in per:
            per[m]["final"] = final.metrics.get(m, {})
    rows = [{"metric": m, "direction": d, **{k: v.get(d) for k, v in cols.items()}}
            for m, cols in per.items() for d in cols["baseline"]]
    sigs = "".join(f"<li>{html.escape(m)}: <code>{html.escape(s)}</code></li>" for m, s in run["signatures"].items())
    parts += ["<h2>Per direction (calibration directions)</h2>", _table(pd.DataFrame(rows)),
              f"<p>Signatures (sacrebleu):</p><ul>{sigs}</ul>"]
    if not sens.empty:
        write_text(run_dir / "sensitivity.csv", sens.to_csv())
        plot_sensitivity(sens, run_dir / "sensitivity.png", metric, f"{metric} drop when one unit is removed alone")
        parts += ["<h2>Sensitivity: which directions lose which unit</h2>", _img(run_dir / "sensitivity.png")]
    trace = _read(run_dir / "trace.json") or {}
    if trace.get("steps"):
        steps = pd.DataFrame([{"step": s["step"], "removed": s.get("best_unit"), "score": s["best_score"],
                               "drop": s["drop"], "accepted": s.get("accepted"), "tried": _count(s.get("tried", 0))}
                              for s in trace["steps"]])
        parts += [f"<h2>{html.escape(trace.get('strategy', 'strategy'))} trace</h2>", _table(steps)]
    held = _read(run_dir / "heldout.json")
    if held:
        parts += ["<h2>Held-out directions</h2>",
                  f"<p>{', '.join(held['directions'])}: baseline {held['baseline']['score']:.2f}, final "
                  f"{held['final']['score']:.2f} (drop {held['final']['drop']:.2f}).</p>"]
    calib = _read(run_dir / "calibration.json")
    if calib:
        parts += ["<h2>Calibration</h2>", _table(pd.DataFrame(calib["calibrations"])[
            ["calibration", "removed", "calibration_drop", "heldout_drop", "all_drop"]]), _img(run_dir / "calibration.png")]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    write_text(run_dir / "report.html", page)
    return run_dir / "report.html"
