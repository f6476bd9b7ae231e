"""Healing ablations on the demo: the dense reference model without the 3 layers greedy removes first
(enc.1, enc.3, enc.5), healed with LoRA on KD data only (the recipe's loss, the previous recipe's, and
plain cross-entropy), references only (no teacher) and both; scored on Multi30k test_2016_flickr (all 1,000 sentences,
6 English-centric directions).

    python bench/bench_heal.py [--run RUN_DIR] [--ablations kd,kd-plain,kd-seq,refs,both] [--config search_spaces/heal_demo.yaml]

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


# name -> recipe overrides. The recipe's loss is the token-level KL to the unpruned model (train.word_kd: 1) plus
# its encoder output (train.hidden_kd), adapters in the encoder only (lora.stacks: pruned), the frozen model's dropout
# off. kd-plain is the recipe before those three (KL only, dropout on, adapters everywhere); kd-seq and refs use
# plain cross-entropy: sequence-level KD only, and no teacher at all; both adds the references as KD targets.
ABLATIONS = {"kd": ["mix=kd"],
             "kd-plain": ["mix=kd", "train.hidden_kd=0", "train.model_dropout=true", "lora.stacks=all"],
             "kd-seq": ["mix=kd", "train.word_kd=0", "train.hidden_kd=0"],
             "refs": ["mix=refs", "train.word_kd=0", "train.hidden_kd=0"],
             "both": ["mix=both"]}


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
    ap.add_argument("--ablations", default=",".join(ABLATIONS),
                    help=f"comma-separated, from {', '.join(ABLATIONS)}")
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
    names = [m.strip() for m in args.ablations.split(",") if m.strip()]
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        raise SystemExit(f"--ablations: {bad[0]!r} is not one of {', '.join(ABLATIONS)}")
    for mix in names:
        marks: list[tuple[str, float, float]] = []

        def log(msg: str, marks=marks) -> None:
            marks.append((msg[:100], time.time(), meter.total()))
            print(msg, flush=True)

        cfg = load_heal_config(args.config, [*args.overrides, *ABLATIONS[mix], f"name=bench-{mix}",
                                             f"kd.cache={scratch / 'kd'}", f"evaluate.store={scratch / 'store.sqlite'}"])
        cpu0, t0 = meter.total(), time.time()
        heal_dir = run_heal(run_dir, ["best"], cfg, log=log)
        wall, cpu = time.time() - t0, meter.total() - cpu0
        status = json.loads((heal_dir / "heal.json").read_text())
        (res,) = status["results"]
        rec = res["recovered"]
        # CPU per stage from the pipeline's log lines: start + KD data | scores before/after pruning |
        # training + export | scores after healing
        def at(prefix: str, default: float) -> float:
            return next((c for m, _, c in marks if m.startswith(prefix)), default)

        kd_done = max((c for m, _, c in marks if m.startswith("[cullmt-ray heal] KD data:")), default=cpu0)
        train_start = at("[cullmt-ray heal] training", cpu0)
        exported = at("[cullmt-ray heal] exported", cpu0 + cpu)
        ablations[mix] = {
            "overrides": ABLATIONS[mix], "recipe": cfg.to_dict(), "mix": cfg.mix, "word_kd": cfg.train.word_kd, "hidden_kd": cfg.train.hidden_kd,
            "model_dropout": cfg.train.model_dropout, "lora_stacks": cfg.lora.stacks,
            "heal_dir": str(heal_dir), "removed": res["removed"],
            "bleu": rec["bleu"], "spbleu": rec["spbleu"], "chrf++": rec["chrf++"],
            "target_bleu_recovered_50pct": (rec["bleu"]["fraction"] or 0) >= 0.5,
            "per_direction_bleu": {k: {d: v for d, v in s["metrics"]["bleu"].items()}
                                   for k, s in res["scores"].items()},
            "kd": status.get("kd"), "training_pairs": status.get("training_pairs"),
            "training": res["training"], "stages_wall_seconds": status.get("stages_seconds"),
            "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "cpu_minutes": round(cpu / 60, 2),
            "cpu_seconds_by_stage": {"start_and_kd_data": round(kd_done - cpu0, 1),
                                     "scores_before_and_after_pruning": round(train_start - kd_done, 1),
                                     "train_and_export": round(exported - train_start, 1),
                                     "scores_after_healing": round(cpu0 + cpu - exported, 1)},
            "cpu_minutes_heal_without_scoring": round((kd_done - cpu0 + exported - train_start) / 60, 2),
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
