"""Cheap proxies vs the real metric: rank agreement (Spearman) over single-unit removals.

For every unit of the model: the real drop of the primary metric when that unit alone is
removed (decoding + sacrebleu, through the evaluator pool), the teacher-forced KL to the full
model, and the angular distance of the layer. Reports each proxy's Spearman correlation with
the real drop and how much cheaper it was (seconds of actor time, summed).
    python bench/bench_proxies.py [--sentences 40]
"""

from __future__ import annotations

import ray
from common import parser, save

from cullmt_ray.candidate import BASELINE, Candidate
from cullmt_ray.data import load_devset, parse_directions
from cullmt_ray.config import ResourcesConfig as Resources
from cullmt_ray.evaluator import EvalSettings, EvaluatorPool
from cullmt_ray.config import Decoding, ModelConfig
from cullmt_ray.proxies import spearman


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(sentences=40)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = load_devset("builtin:demo").subsample(args.sentences)
    dirs = parse_directions("english-centric", ds.languages)
    pool = EvaluatorPool(ModelConfig(args.model), ds, EvalSettings(spm="reference", decoding=Decoding(batch_size=16)),
                         Resources(actors=2), run="bench-proxies")
    try:
        units = pool.info[0]["units"]
        real = dict(pool.evaluate([(BASELINE, dirs)] + [(Candidate.of([u]), dirs) for u in units]))
        base = real[BASELINE]["score"]
        drop = {u: base - real[Candidate.of([u])]["score"] for u in units}
        decode_seconds = sum(r["seconds"] for c, r in real.items() if c != BASELINE)
        prox = pool.proxies(units, dirs)
    finally:
        pool.shutdown()
    res = {"model": args.model, "dev": "builtin:demo, English-centric", "sentences": args.sentences,
           "units": units, "real_drop": {u: round(v, 4) for u, v in drop.items()},
           "kl": {u: round(v, 6) for u, v in prox["kl"].items()},
           "angle": {u: round(v, 6) for u, v in prox["angle"].items()},
           "spearman_kl_vs_drop": round(spearman([prox["kl"][u] for u in units], [drop[u] for u in units]), 3),
           "spearman_angle_vs_drop": round(spearman([prox["angle"][u] for u in units], [drop[u] for u in units]), 3),
           "decode_seconds": round(decode_seconds, 2), "proxy_seconds": round(prox["seconds"], 2),
           "speedup": round(decode_seconds / prox["seconds"], 2)}
    print({k: res[k] for k in ("spearman_kl_vs_drop", "spearman_angle_vs_drop", "speedup")})
    save("proxies", res, args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
