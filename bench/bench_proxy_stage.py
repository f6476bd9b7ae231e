"""Greedy with a KL proxy as first stage vs plain greedy, on the dense reference model.

Both remove ``--target-removed`` layers with the settings of bench_compare (demo dev set,
English-centric, spBLEU). The staged run scores every option of a step by teacher-forced KL to
the full model (no decoding) and decodes only the best ``--keep`` fraction. Target of the
strategies issue: reach greedy's final (size, score) with at most 30% of its full-evaluation
equivalents (sentences generated); wall time is reported next to it, KL passes included.
Each run gets a fresh store, so nothing is read from cache.
    python bench/bench_proxy_stage.py [--sentences 60] [--target-removed 4] [--keep 0.25]
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from common import parser, save

from cullmt_ray.config import load_config
from cullmt_ray.search import run_search


def run(args, tmp: Path, name: str, extra: list[str]) -> dict:
    cfg = load_config(None, [f"model.name={args.model}", f"data.max_sentences={args.sentences}",
                             f"search.target_removed={args.target_removed}", "search.threshold=100",
                             f"output.dir={tmp / name}", f"output.store={tmp / name / 'store.sqlite'}",
                             f"name={name}", *extra])
    run_dir = run_search(cfg)
    info = json.loads((run_dir / "run.json").read_text())
    trace = json.loads((run_dir / "trace.json").read_text())
    final = trace["steps"][-1]
    return {"final": trace["final"], "score": final["best_score"], "steps": len(trace["steps"]),
            "decoded_candidates": sum(1 for e in trace["history"] if e["score"] >= 0),
            "proxy_candidates": sum(1 for e in trace["history"] if e["score"] < 0),
            "sentences_generated": info["budget"]["sentences"], "wall_seconds": info["wall_seconds"]}


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(sentences=60)
    ap.add_argument("--target-removed", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.25)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cullmt-bench-"))
    try:
        plain = run(args, tmp, "greedy", [])
        staged = run(args, tmp, "greedy-kl", ["search.fidelity.proxy=kl", f"search.fidelity.keep={args.keep}"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    frac = staged["sentences_generated"] / plain["sentences_generated"]
    reaches = staged["score"] >= plain["score"] - 1e-9
    res = {"model": args.model, "dev": "builtin:demo (English-centric, 6 directions)", "sentences": args.sentences,
           "target_removed": args.target_removed, "keep": args.keep, "greedy": plain, "greedy_kl_stage": staged,
           "fraction_of_greedy_sentences": round(frac, 3),
           "wall_ratio": round(staged["wall_seconds"] / plain["wall_seconds"], 3),
           "target": {"reaches_greedy_final": reaches, "met_within_30pct": bool(reaches and frac <= 0.30)}}
    print(json.dumps({k: res[k] for k in ("fraction_of_greedy_sentences", "wall_ratio", "target")}, indent=1))
    save("proxy_stage", res, args.out)


if __name__ == "__main__":
    main()
