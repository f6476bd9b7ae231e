"""Healing ablations on the demo: the dense reference model without the 3 layers greedy removes first
(enc.1, enc.3, enc.5), healed with LoRA on KD data only, references only, and both; scored on
Multi30k test_2016_flickr (all 1,000 sentences, 6 English-centric directions).

    python bench/bench_heal.py [--run RUN_DIR] [--mixes kd,refs,both] [--config search_spaces/heal_demo.yaml]

Without --run it runs the greedy search first (search_spaces/demo_dense.yaml, --target-removed 3).
Target: healing recovers >= 50% of the BLEU lost by pruning within 15 CPU-minutes. CPU time is
measured over this process and every process it starts (the Ray cluster: GCS, raylet, actors,
Train workers), sampled every 0.5 s; other jobs on the machine are not counted. The KD cache and
the results store are fresh for this run, so the first ablation that needs KD data pays for it and
the others reuse it, as later heals do. Writes results/bench/heal.json.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
from common import REPO, parser, save

os.environ.setdefault("CULLMT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.5):
        self.me = psutil.Process()
        self.seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> last cpu seconds
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        try:
            procs = [self.me, *self.me.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.seen[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def total(self) -> float:
        self._sample()
        return sum(self.seen.values())

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", help="a search run folder (default: run the greedy search now)")
    ap.add_argument("--mixes", default="kd,refs,both")
    ap.add_argument("--config", default=str(REPO / "search_spaces" / "heal_demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.chdir(REPO)

    from cullmt_ray.config import load_config
    from cullmt_ray.heal import load_heal_config, run_heal
    from cullmt_ray.search import run_search

    meter = CpuMeter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    scratch = REPO / "results" / f"bench-heal-{stamp}"
    out: dict = {"config": args.config, "overrides": args.overrides, "scratch": str(scratch)}
    cpu0, t0 = meter.total(), time.time()
    if args.run:
        run_dir = Path(args.run)
    else:
        cfg = load_config(REPO / "search_spaces" / "demo_dense.yaml",
                          ["search.target_removed=3", f"output.dir={scratch / 'runs'}", "name=bench-heal"])
        run_dir = run_search(cfg)
    import json

    info = json.loads((run_dir / "run.json").read_text())
    out["search"] = {"run": str(run_dir), "removed": info["final"]["removed"], "given": bool(args.run),
                     "wall_seconds": round(time.time() - t0, 1), "cpu_seconds": round(meter.total() - cpu0, 1)}
    print(f"[bench] prune set {info['final']['removed']}", flush=True)

    ablations = {}
    for mix in [m.strip() for m in args.mixes.split(",") if m.strip()]:
        marks: list[tuple[str, float, float]] = []

        def log(msg: str, marks=marks) -> None:
            marks.append((msg[:100], time.time(), meter.total()))
            print(msg, flush=True)

        cfg = load_heal_config(args.config, [*args.overrides, f"mix={mix}", f"name=bench-{mix}",
                                             f"kd.cache={scratch / 'kd'}", f"evaluate.store={scratch / 'store.sqlite'}"])
        cpu0, t0 = meter.total(), time.time()
        heal_dir = run_heal(run_dir, ["best"], cfg, log=log)
        wall, cpu = time.time() - t0, meter.total() - cpu0
        status = json.loads((heal_dir / "heal.json").read_text())
        (res,) = status["results"]
        rec = res["recovered"]
        # CPU up to the first 'training' line = start + KD + scores before; after the last = export + scores after
        train_start = next((c for m, _, c in marks if m.startswith("[cullmt-ray heal] training")), cpu0)
        ablations[mix] = {
            "heal_dir": str(heal_dir), "removed": res["removed"],
            "bleu": rec["bleu"], "spbleu": rec["spbleu"], "chrf++": rec["chrf++"],
            "target_bleu_recovered_50pct": (rec["bleu"]["fraction"] or 0) >= 0.5,
            "per_direction_bleu": {k: {d: v for d, v in s["metrics"]["bleu"].items()}
                                   for k, s in res["scores"].items()},
            "kd": status.get("kd"), "training_pairs": status.get("training_pairs"),
            "training": res["training"], "stages_wall_seconds": status.get("stages_seconds"),
            "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "cpu_minutes": round(cpu / 60, 2),
            "cpu_seconds_before_training": round(train_start - cpu0, 1),
            "signatures": res["signatures"],
        }
        print(f"[bench] {mix}: BLEU {rec['bleu']['before_pruning']:.2f} -> {rec['bleu']['after_pruning']:.2f} pruned "
              f"-> {rec['bleu']['after_healing']:.2f} healed ({(rec['bleu']['fraction'] or 0) * 100:.0f}% recovered); "
              f"{wall:.0f} s wall, {cpu / 60:.1f} CPU-min", flush=True)
    meter.stop()
    out["ablations"] = ablations
    out["target"] = ("healing recovers >= 50% of the BLEU lost by pruning (test_2016_flickr, 6 directions) "
                     "within 15 CPU-minutes")
    out["load_average_at_end"] = os.getloadavg()
    save("heal", out, args.out)


if __name__ == "__main__":
    main()
