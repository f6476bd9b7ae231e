"""Healing deep cuts (issue 17): the dense reference model without a third of its layers, a decoder layer
among them, and the Llama reference model without 2 of its 6 blocks; several seeds of one recipe each.

    python bench/bench_heal_deep.py --model dense [--seeds 0,1,2] [--eval test|val] [--set KEY=VALUE ...]

The cuts come from the ground truth (results/bench/ground_truth/*.parquet, every prune set on 32 dev
sentences): dense enc.3 enc.4 enc.5 dec.3 (the best set of 4 with a decoder layer; -4.2 BLEU on 300 val
sentences per direction), llama layer.2 layer.4 (the best pair). The search run handed to heal is
written here (no search is run); its dev set, the one validation during training uses, is Multi30k val.
``--eval val`` scores on Multi30k val (decisions), ``--eval test`` on test_2016_flickr (1,000 x 6, the
report). CPU time is this process and its children (Ray), as in bench_heal.py; healing CPU is training +
export; the teacher's KD translations are cached in the scratch folder and shared by the seeds and runs
(their CPU is counted once, separately). Merges into results/bench/heal_deep.json under MODEL/TAG and
rewrites results/bench/heal_deep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import yaml
from bench_heal import CpuMeter
from common import REPO, RESULTS, save

os.environ.setdefault("CULLMT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "dense": {"search": "search_spaces/demo_dense.yaml", "recipe": "search_spaces/heal_deep_dense.yaml",
              "cut": ["enc.3", "enc.4", "enc.5", "dec.3"]},
    "llama": {"search": "search_spaces/demo_llama.yaml", "recipe": "search_spaces/heal_deep_llama.yaml",
              "cut": ["layer.2", "layer.4"]},
}
METRICS = ("bleu", "spbleu", "chrf++")
SCRATCH = REPO / "results" / "bench-heal-deep"


def run_folder(model: str, cut: list[str]) -> Path:
    """A finished search run (as cullmt-ray search writes it) whose final prune set is ``cut``."""
    from cullmt_ray.config import load_config

    cfg = load_config(REPO / MODELS[model]["search"], ["data.dev=../shared/data/multi30k", "data.split=val",
                                                       "data.max_sentences=null", f"name=deep-{model}",
                                                       f"output.store={SCRATCH / 'store.sqlite'}"])
    d = SCRATCH / "runs" / f"{model}-{'-'.join(cut)}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (d / "run.json").write_text(json.dumps({"status": "finished", "final": {"removed": cut},
                                            "note": "written by bench/bench_heal_deep.py (the cut, no search)"}))
    return d


def heal_one(run_dir: Path, recipe: str, overrides: list[str], meter: CpuMeter) -> dict:
    from cullmt_ray.heal import load_heal_config, run_heal

    marks: list[tuple[str, float]] = []

    def log(msg: str) -> None:
        marks.append((msg[:100], meter.total()))
        print(msg, flush=True)

    cfg = load_heal_config(recipe, overrides)
    cpu0, t0 = meter.total(), time.time()
    heal_dir = run_heal(run_dir, ["best"], cfg, log=log)
    cpu = meter.total() - cpu0
    status = json.loads((heal_dir / "heal.json").read_text())
    (res,) = status["results"]

    def at(prefix: str, default: float) -> float:
        return next((c for m, c in marks if m.startswith(prefix)), default)

    kd_done = max((c for m, c in marks if m.startswith("[cullmt-ray heal] KD data:")), default=cpu0)
    train_start = at("[cullmt-ray heal] training", cpu0)
    exported = at("[cullmt-ray heal] exported", cpu0 + cpu)
    hist = [{k: h.get(k) for k in ("step", "train_loss", "val_bleu", "val_spbleu", "val_kl", "val_kd_loss")}
            for h in json.loads((Path(res["model_dir"]) / "cullmt_ray.json").read_text())["training"]["history"]]
    return {"heal_dir": str(heal_dir), "removed": res["removed"], "overrides": overrides,
            **{m: res["recovered"][m] for m in METRICS},
            "kd": status.get("kd"), "training": res["training"], "history": hist,
            "wall_seconds": round(time.time() - t0, 1),
            "cpu_minutes": {"kd_data_and_start": round((kd_done - cpu0) / 60, 2),
                            "scores_before_and_after_pruning": round((train_start - kd_done) / 60, 2),
                            "healing": round((exported - train_start) / 60, 2),
                            "scores_after_healing": round((cpu0 + cpu - exported) / 60, 2)},
            "signatures": res["signatures"]}


def kd_cpu_elsewhere(key: str) -> float | None:
    """CPU-min of the same KD data (same cache key) where bench_heal.py made it (results/bench/heal.json)."""
    f = RESULTS / "heal.json"
    for a in (json.loads(f.read_text()).get("ablations", {}) if f.is_file() else {}).values():
        if (a.get("kd") or {}).get("key") == key and not a["kd"]["cached"]:
            return round(a["cpu_seconds_by_stage"]["start_and_kd_data"] / 60, 2)
    return None


def summary(runs: list[dict]) -> dict:
    """Median and range over the seeds of the healed scores and the share of the loss recovered."""
    out = {"seeds": len(runs)}
    for m in METRICS:
        healed = [r[m]["after_healing"] for r in runs]
        frac = [r[m]["fraction"] for r in runs if r[m]["fraction"] is not None]
        out[m] = {"before_pruning": runs[0][m]["before_pruning"], "after_pruning": runs[0][m]["after_pruning"],
                  "drop": round(runs[0][m]["lost"], 2), "healed_median": round(statistics.median(healed), 2),
                  "healed_range": [round(min(healed), 2), round(max(healed), 2)],
                  "recovered_median": round(statistics.median(frac), 3) if frac else None,
                  "recovered_range": [round(min(frac), 3), round(max(frac), 3)] if frac else None}
    out["healing_cpu_minutes_median"] = round(statistics.median(r["cpu_minutes"]["healing"] for r in runs), 2)
    out["healing_cpu_minutes_max"] = round(max(r["cpu_minutes"]["healing"] for r in runs), 2)
    out["target_met"] = bool(out["bleu"]["recovered_median"] is not None and out["bleu"]["recovered_median"] >= 0.6
                             and out["healing_cpu_minutes_max"] <= 30)
    return out


def markdown(data: dict) -> str:
    rows = ["| model | cut | eval | seeds | metric | original | pruned (drop) | healed median [range] | "
            "% recovered median [range] | healing CPU-min (median / max) | KD data CPU-min (once) |",
            "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, tags in data.get("models", {}).items():
        for tag, entry in tags.items():
            s, kd = entry["summary"], entry.get("kd_cpu_minutes")
            for m in METRICS:
                x = s[m]
                rec = (f"{100 * x['recovered_median']:.0f}% [{100 * x['recovered_range'][0]:.0f}, "
                       f"{100 * x['recovered_range'][1]:.0f}]") if x["recovered_median"] is not None else "-"
                rows.append(f"| {model} ({tag}) | {' '.join(entry['cut'])} | {entry['eval']} | {s['seeds']} | {m} | "
                            f"{x['before_pruning']:.2f} | {x['after_pruning']:.2f} ({-x['drop']:+.2f}) | "
                            f"{x['healed_median']:.2f} [{x['healed_range'][0]:.2f}, {x['healed_range'][1]:.2f}] | "
                            f"{rec} | {s['healing_cpu_minutes_median']:.1f} / {s['healing_cpu_minutes_max']:.1f} | "
                            f"{kd if kd is not None else '-'} |")
    return ("# Healing deep cuts (bench/bench_heal_deep.py)\n\n" + "\n".join(rows) + "\n\n"
            "% recovered = (healed - pruned) / (original - pruned). Healing CPU-min: training + export (Ray Train, "
            "every worker). KD data: the teacher's translations of the corpus, cached and shared by the seeds.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="dense")
    ap.add_argument("--out", default=None, help="result JSON (default results/bench/heal_deep.json)")
    ap.add_argument("--cut", default=None, help="comma-separated units (default: the model's chosen cut)")
    ap.add_argument("--recipe", default=None, help="heal recipe (default: search_spaces/heal_deep_MODEL.yaml)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval", choices=["test", "val"], default="test")
    ap.add_argument("--eval-sentences", type=int, default=None, help="per direction (default: all)")
    ap.add_argument("--tag", default=None, help="key of this recipe in the JSON (default: final / val)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.chdir(REPO)
    spec = MODELS[args.model]
    cut = args.cut.split(",") if args.cut else spec["cut"]
    recipe = args.recipe or str(REPO / spec["recipe"])
    tag = args.tag or ("final" if args.eval == "test" else "val")
    split = "test_2016_flickr" if args.eval == "test" else "val"
    meter = CpuMeter()
    run_dir = run_folder(args.model, cut)
    out_json = Path(args.out) if args.out else RESULTS / "heal_deep.json"
    data = json.loads(out_json.read_text()) if out_json.is_file() else {}
    data = {k: v for k, v in data.items() if k not in ("benchmark", "when", "machine")}
    prev = data.get("models", {}).get(args.model, {}).get(tag, {})
    seeds = [int(s) for s in args.seeds.split(",")]
    # runs of other seeds with the same recipe and evaluation are kept (a later call adds seeds)
    same = prev.get("cut") == cut and prev.get("recipe") == recipe and prev.get("overrides") == args.overrides
    runs = [r for r in prev.get("runs", []) if r["seed"] not in seeds] if same else []
    for seed in seeds:
        overrides = [*args.overrides, f"train.seed={seed}", f"name=deep-{args.model}-{tag}-s{seed}",
                     f"kd.cache={SCRATCH / 'kd'}", f"evaluate.store={SCRATCH / 'store.sqlite'}",
                     "evaluate.dev=../shared/data/multi30k", f"evaluate.split={split}",
                     f"evaluate.max_sentences={args.eval_sentences or 'null'}"]
        r = heal_one(run_dir, recipe, overrides, meter)
        r["seed"] = seed
        runs = sorted([*runs, r], key=lambda x: x["seed"])
        b = r["bleu"]
        print(f"[bench] {args.model} seed {seed}: BLEU {b['before_pruning']:.2f} -> {b['after_pruning']:.2f} pruned -> "
              f"{b['after_healing']:.2f} healed ({100 * (b['fraction'] or 0):.0f}%); healing "
              f"{r['cpu_minutes']['healing']:.1f} CPU-min", flush=True)
        kd_runs = [x for x in runs if x["kd"] and not x["kd"]["cached"]]
        entry = {"cut": cut, "eval": f"multi30k {split}" + (f" ({args.eval_sentences}/direction)"
                                                            if args.eval_sentences else " (all x 6 directions)"),
                 "recipe": recipe, "overrides": args.overrides,
                 "kd_cpu_minutes": kd_runs[0]["cpu_minutes"]["kd_data_and_start"] if kd_runs
                 else prev.get("kd_cpu_minutes") or kd_cpu_elsewhere(r["kd"]["key"]),
                 "kd_pairs": r["kd"]["pairs"],
                 "summary": summary(runs), "runs": runs}
        data.setdefault("models", {}).setdefault(args.model, {})[tag] = entry
        data["target"] = ("recover >= 60% of the BLEU lost within 30 CPU-min of healing (test_2016_flickr, "
                          "1,000 x 6 English-centric directions; median of the seeds)")
        save("heal_deep", data, str(out_json))
        out_json.with_suffix(".md").write_text(markdown(data))
    meter.stop()


if __name__ == "__main__":
    main()
