"""Strategies against the exact optimum: replay every strategy over N seeds on the ground-truth
tables (``bench/bench_ground_truth.py``) and write ``replay.{json,md,png}`` per table.

Each strategy (and variant: options, the KL stage of ``search.fidelity`` with a ``keep`` fraction)
runs at every size 1..4 with greedy's budget for that size; see :mod:`cullmt_ray.replay`.
    python bench/bench_replay.py [--seeds 30] [--tables dense,llama] [--proxy-cost measure|X] [--sizes 1,2,3,4,5,6]

``--proxy-cost measure`` times a KL evaluation against a decoded one on the table's model and
settings, interleaved on the same prune sets in one process (the ratio the cost columns use); the
table's own seconds were measured at other times and loads.
"""

from __future__ import annotations

import argparse
import json
import os
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
        out += [f"greedy+kl={keep}/free", f"hybrid+kl={keep}/free", f"greedy+kl={keep}", f"hybrid+kl={keep}",
                {"label": f"hybrid(no mix)+kl={keep}", "strategy": "hybrid", "options": {"mix": False}, "keep": keep}]
    return out


def measure_proxy_cost(table_path: Path, n_sets: int = 8) -> tuple[float, str]:
    """Median seconds ratio KL / decode over ``n_sets`` prune sets of the table (interleaved, 1 thread)."""
    import random
    import statistics
    import time

    import torch

    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.evaluator import EvaluatorActor, EvalSettings
    from cullmt_ray.replay import load_table

    table = load_table(table_path)
    meta = table.meta
    torch.set_num_threads(1)
    ds = load_devset(meta["dev"]).subsample(meta["sentences_per_direction"])
    dirs = parse_directions(meta["directions"], ds.languages)
    dec = Decoding(**{**meta["decoding"], "max_new_tokens": meta["max_new_tokens"]})
    actor = EvaluatorActor(ModelConfig(meta["model"]), ds, EvalSettings(spm="reference", decoding=dec), 1, "bench")
    actor.kl([], dirs)  # the full model's side is cached once per actor, as in a search
    sets = random.Random(0).sample([c for c in table.rows if c.removed], n_sets)
    ratios = []
    for c in sets:
        t = time.perf_counter()
        actor.evaluate(list(c.units), dirs)
        d = time.perf_counter() - t
        t = time.perf_counter()
        actor.kl(list(c.units), dirs)
        ratios.append((time.perf_counter() - t) / d)
    ratio = round(statistics.median(ratios), 3)
    load = os.getloadavg()[0]
    return ratio, (f"measured by bench_replay.py: median KL/decode seconds over {n_sets} sets, interleaved, "
                   f"1 thread, load {load:.1f}")


def _units(path: Path) -> list:
    """The removable units of a table (a size must leave one)."""
    from cullmt_ray.replay import load_table

    return load_table(path).space.removable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--tables", default="dense,llama")
    ap.add_argument("--proxy-cost", default=None, help="a KL evaluation's cost in decoded ones: a number, or "
                    "'measure' (default: each table's seconds ratio)")
    ap.add_argument("--keeps", default="0.25,0.34,0.5", help="KL-stage keep fractions to try")
    ap.add_argument("--sizes", default=None, help="prune-set sizes to replay, e.g. 1,2,3,4,5,6 (default: the "
                    "table's complete sizes up to 4; the target is judged on sizes <= 4)")
    args = ap.parse_args()
    sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else None
    keeps = [float(k) for k in args.keeps.split(",") if k]
    for name in args.tables.split(","):
        path = OUT / f"{name}.parquet"
        cost, source = None, None
        if args.proxy_cost == "measure":
            cost, source = measure_proxy_cost(path)
            print(f"{name}: KL/decode = {cost} ({source})")
        elif args.proxy_cost is not None:
            cost, source = float(args.proxy_cost), "given on the command line"
        out = run_replay(path, variants(keeps), seeds=args.seeds, out_dir=OUT / f"replay-{name}",
                         options=OPTIONS, proxy_cost=cost, proxy_source=source,
                         sizes=[k for k in sizes if k < len(_units(path))] if sizes else None)
        target = json.loads((out / "replay.json").read_text())["target"]
        print(json.dumps({k: v["met"] for k, v in target.items()}))


if __name__ == "__main__":
    main()
