"""Candidates per minute with 1 vs 2 evaluator actors on this machine (a ratio from one run).
    python bench/bench_actors.py [--model reference:dense] [--sentences 48]
"""

from __future__ import annotations

import time

import ray
from common import parser, save

from cullmt_ray.candidate import Candidate
from cullmt_ray.data import load_devset
from cullmt_ray.config import ResourcesConfig as Resources
from cullmt_ray.evaluator import EvalSettings, EvaluatorPool
from cullmt_ray.config import Decoding, ModelConfig


def rate(n_actors: int, spec: ModelConfig, ds, jobs) -> float:
    pool = EvaluatorPool(spec, ds, EvalSettings(spm="reference", decoding=Decoding(batch_size=16)),
                         Resources(actors=n_actors), run=f"bench{n_actors}")
    try:
        t = time.perf_counter()
        n = sum(1 for _ in pool.evaluate(jobs))
        return n / (time.perf_counter() - t) * 60
    finally:
        pool.shutdown()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--candidates", type=int, default=12)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    spec = ModelConfig(args.model)
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"]).subsample(args.sentences)
    from cullmt_ray.families import load_family

    units = load_family(spec).units()
    jobs = [(Candidate.of([u]), [("eng_Latn", "deu_Latn")]) for u in units[: args.candidates]]
    one = rate(1, spec, ds, jobs)
    two = rate(2, spec, ds, jobs)
    res = {"model": args.model, "candidates": len(jobs), "sentences_per_candidate": len(ds),
           "cpus": ray.cluster_resources().get("CPU"), "candidates_per_min_1_actor": round(one, 2),
           "candidates_per_min_2_actors": round(two, 2), "ratio_2_over_1": round(two / one, 2)}
    print(res)
    save("actors_1_vs_2", res, args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
