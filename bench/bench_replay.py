"""Strategies against the exact optimum: replay every strategy over N seeds on the ground-truth
tables (``bench/bench_ground_truth.py``) and write ``replay.{json,md,png}`` per table.

Each strategy (and variant: options, the KL stage of ``search.fidelity`` with a ``keep`` fraction)
runs at every size 1..4 with greedy's budget for that size; see :mod:`cullmt_ray.replay`.
    python bench/bench_replay.py [--seeds 30] [--tables dense,llama]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cullmt_ray.replay import run_replay  # noqa: E402

OUT = REPO / "results" / "bench" / "ground_truth"
OPTIONS = {"beam": {"width": 3}, "tpe": {"n_startup_trials": 6}, "nsga2": {"population_size": 8},
           "motpe": {"population_size": 8}}  # as search_spaces/compare_dense.yaml


def variants(keeps: list[float]) -> list:
    """The live strategies as configured for compare, then hybrid options and KL-stage variants."""
    out: list = ["greedy", "beam", "evolutionary", "tpe", "nsga2", "motpe", "random", "hybrid",
                 {"label": "hybrid(polish every size)", "strategy": "hybrid", "options": {"polish_all": True}},
                 {"label": "hybrid(extend=3,swaps=3,rounds=2)", "strategy": "hybrid",
                  "options": {"extend": 3, "swaps": 3, "rounds": 2}},
                 {"label": "hybrid(no mix)", "strategy": "hybrid", "options": {"mix": False}},
                 {"label": "hybrid(extend=all)", "strategy": "hybrid", "options": {"extend": 0}}]
    for keep in keeps:
        out += [f"greedy+kl={keep}/free", f"hybrid+kl={keep}/free", f"greedy+kl={keep}", f"hybrid+kl={keep}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--tables", default="dense,llama")
    ap.add_argument("--keeps", default="0.25,0.34,0.5", help="KL-stage keep fractions to try")
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",") if k]
    for name in args.tables.split(","):
        out = run_replay(OUT / f"{name}.parquet", variants(keeps), seeds=args.seeds, out_dir=OUT / f"replay-{name}",
                         options=OPTIONS)
        target = json.loads((out / "replay.json").read_text())["target"]
        print(json.dumps({k: v["met"] for k, v in target.items()}))


if __name__ == "__main__":
    main()
