"""Apply + restore of a prune set: time per candidate, and RSS over 100 candidates (flat: no copies).

For contrast it measures the naive route too: ``copy.deepcopy`` of the model per candidate.
    python bench/bench_apply.py [--model reference:dense]
"""

from __future__ import annotations

import copy
import gc
import random
import time

import psutil
from common import parser, save

from cullmt_ray.config import ModelConfig
from cullmt_ray.families import load_family


def main() -> None:
    args = parser(__doc__).parse_args()
    fam = load_family(ModelConfig(args.model))
    units = fam.units()
    rng = random.Random(0)
    sets = [rng.sample(units, rng.randint(1, len(units) // 2)) for _ in range(100)]
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    rss, times = [], []
    for s in sets:
        t = time.perf_counter()
        with fam.apply(s):
            pass
        times.append(time.perf_counter() - t)
        rss.append(proc.memory_info().rss)
    copy_times, copy_rss = [], []
    for s in sets[:10]:
        t = time.perf_counter()
        m = copy.deepcopy(fam.model)
        copy_times.append(time.perf_counter() - t)
        copy_rss.append(proc.memory_info().rss)
        del m
        gc.collect()
    mean_apply = sum(times) / len(times)
    mean_copy = sum(copy_times) / len(copy_times)
    res = {"model": args.model, "units": len(units), "model_bytes": fam.size().bytes,
           "apply_restore_us_mean": round(mean_apply * 1e6, 1), "apply_restore_us_max": round(max(times) * 1e6, 1),
           "deepcopy_ms_mean": round(mean_copy * 1e3, 2), "deepcopy_over_apply": round(mean_copy / mean_apply, 1),
           "rss_start_mib": round(rss0 / 2**20, 1), "rss_after_100_mib": round(rss[-1] / 2**20, 1),
           "rss_growth_over_100_candidates_mib": round((max(rss) - rss0) / 2**20, 2),
           "rss_peak_with_deepcopy_mib": round(max(copy_rss) / 2**20, 1)}
    print(res)
    save("apply_restore", res, args.out)


if __name__ == "__main__":
    main()
