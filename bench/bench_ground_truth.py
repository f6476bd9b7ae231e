"""Ground-truth tables for the search strategies: every allowed prune set scored exactly.

Runs the ``exhaustive`` strategy through the normal driver pieces (evaluator pool + results store)
on a fixed dev subset, decoding every set (spBLEU, chrF++, BLEU) and, with ``--passes decode,kl``,
also scoring its teacher-forced KL to the full model. Every evaluation lands in a dedicated store
(``results/ground_truth/store.sqlite``, git-ignored), so a killed build re-run only computes what
is missing. The table (one row per prune set, the baseline included) goes to
``results/bench/ground_truth/<name>.parquet`` with its settings in ``<name>.json``.

    python bench/bench_ground_truth.py --model llama                     # 62 sets
    python bench/bench_ground_truth.py --model dense --max-size 4        # 793 sets
    python bench/bench_ground_truth.py --model dense --max-size 6 --passes kl
    python bench/bench_ground_truth.py --model dense --min-size 5 --max-size 6 --passes decode
                                 # adds sizes 5-6 to the existing table (same settings, baseline checked)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cullmt_ray.candidate import BASELINE  # noqa: E402
from cullmt_ray.config import SearchRunConfig, load_config  # noqa: E402
from cullmt_ray.strategies import SearchSpace  # noqa: E402
from cullmt_ray.strategies.exhaustive import allowed_sets  # noqa: E402

OUT = REPO / "results" / "bench" / "ground_truth"
STORE = REPO / "results" / "ground_truth" / "store.sqlite"
MODELS = {"llama": "search_spaces/demo_llama.yaml", "dense": "search_spaces/demo_dense.yaml"}
PASSES = ("decode", "kl")


def evaluate_all(cfg: SearchRunConfig, passes: list[str], log) -> dict:
    """The one place this script touches the search driver: open a session, run the exhaustive
    strategy once per pass (decode: the configured metrics; kl: the teacher-forced proxy) and read
    every stored evaluation of both contexts back."""
    from cullmt_ray.session import open_session
    from cullmt_ray.strategies import make_strategy

    with open_session(cfg, "ground-truth", folder=False) as session:
        (baseline,) = session.evaluate([BASELINE], "baseline")
        kl_set = session.service.evalset(session.calibration.directions, metric="kl")
        for name in passes:
            strategy = make_strategy(cfg.search, session.units, baseline, name="exhaustive", batch=4)
            es = kl_set if name == "kl" else None
            session.evaluate([BASELINE], f"exhaustive:{name}", es)
            t0, done = time.time(), 0
            while batch := strategy.ask():
                strategy.tell(session.evaluate(batch, f"exhaustive:{name}", es))
                done += len(batch)
                log(f"{name}: {done} sets asked, {session.service.budget.evaluated} computed this run, "
                    f"{time.time() - t0:.0f} s")
        store = session.store
        return {"baseline": baseline, "units": session.units, "protected": list(cfg.search.protect),
                "description": session.calibration.description,
                "decode": {e.candidate: e for e in store.evaluations(session.calibration.context)},
                "kl": {e.candidate: e for e in store.evaluations(kl_set.context)},
                "computed": session.service.budget.evaluated, "actors": session.pool.size}


def table_rows(res: dict, max_size: int) -> list[dict]:
    """One row per allowed prune set of 0..``max_size`` units that has a decoded evaluation."""
    space = SearchSpace(res["units"], frozenset(res["protected"]))
    rows = []
    for c in [BASELINE, *allowed_sets(space, 1, max_size)]:
        e = res["decode"].get(c)
        if e is None:
            continue
        row = {"removed": " ".join(c.units), "n_removed": len(c), "params": e.params, "bytes": e.bytes,
               "score": e.score}
        for m, per in e.metrics.items():
            row[m] = per["mean"]
        for d, v in e.metrics.get("spbleu", {}).items():
            if d != "mean":
                row[f"spbleu:{d}"] = v
        k = res["kl"].get(c)
        row["kl"] = k.metrics["kl"]["mean"] if k else (0.0 if not c.removed else None)
        row["seconds"] = round(e.seconds, 3)
        row["kl_seconds"] = round(k.seconds, 3) if k else None
        rows.append(row)
    return rows


def merged_with_existing(df, path: Path, settings: dict):
    """``df`` plus the rows of the table already at ``path`` that ``df`` lacks (earlier sizes,
    earlier KL passes). Refuses to mix tables built on other settings or another baseline score."""
    import pandas as pd
    import pyarrow.parquet as pq

    if not path.exists():
        return df
    old_meta = json.loads(pq.read_schema(path).metadata[b"cullmt"])
    for key in ("model", "dev", "sentences_per_direction", "directions", "max_new_tokens"):
        if old_meta.get(key) != settings.get(key):
            raise SystemExit(f"{path}: built with {key}={old_meta.get(key)!r}, this run has "
                             f"{settings.get(key)!r}; expected the same settings (or delete the table)")
    old = pd.read_parquet(path)
    base_old = float(old.loc[old["n_removed"] == 0, "score"].iloc[0])
    base_new = float(df.loc[df["n_removed"] == 0, "score"].iloc[0])
    if abs(base_old - base_new) > 1e-6:
        raise SystemExit(f"{path}: baseline {base_old} there, {base_new} now; expected identical scores")
    new = df.set_index("removed")
    old = old.set_index("removed")
    # a KL value the old table has fills the new row's gap; new values win otherwise
    both = new.combine_first(old)
    both = both.reset_index().astype({"n_removed": int})
    return both.sort_values(["n_removed"], kind="stable").reset_index(drop=True)


def export(res: dict, name: str, max_size: int, settings: dict) -> Path:
    """``OUT/<name>.parquet`` (table; settings in the schema metadata) and ``OUT/<name>.json``.
    Rows of an existing table that this run did not compute are kept."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = OUT / f"{name}.parquet"
    df = merged_with_existing(pd.DataFrame(table_rows(res, max_size)), path, settings)
    space = SearchSpace(res["units"], frozenset(res["protected"]))
    expected = {k: sum(1 for c in allowed_sets(space, k, k)) for k in range(1, max_size + 1)}
    have = df["n_removed"].value_counts().to_dict()
    desc = res["description"]
    meta = {**settings, "units": res["units"], "protected": res["protected"], "primary": desc["metric"],
            "signatures": desc["signatures"], "eval": desc["eval"], "decoding": desc["decoding"],
            "baseline": {"score": res["baseline"].score, "params": res["baseline"].params},
            "sizes": {str(k): {"expected": n, "rows": int(have.get(k, 0)),
                               "kl_rows": int(df.loc[df["n_removed"] == k, "kl"].notna().sum())}
                      for k, n in expected.items()},
            "complete_sizes": [k for k, n in expected.items() if have.get(k, 0) == n],
            "evaluation_seconds": round(float(df["seconds"].sum()), 1),
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    OUT.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"cullmt": json.dumps(meta).encode()})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama")
    ap.add_argument("--sentences", type=int, default=32, help="dev sentences per direction (fixed subsample)")
    ap.add_argument("--min-size", type=int, default=1, help="smallest prune set (rows of smaller sets already "
                    "in the table are kept)")
    ap.add_argument("--max-size", type=int, default=None, help="largest prune set (default: all the model allows)")
    ap.add_argument("--passes", default="decode,kl", help="decode, kl or both, in that order")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--store", default=str(STORE))
    args = ap.parse_args()
    passes = [p for p in args.passes.split(",") if p]
    bad = [p for p in passes if p not in PASSES]
    if bad:
        ap.error(f"--passes: {bad[0]!r} is not a pass; expected {', '.join(PASSES)}")
    os.environ.setdefault("CULLMT_NO_PROGRESS", "1")
    max_size = args.max_size or 0
    cfg = load_config(REPO / MODELS[args.model], [
        f"data.max_sentences={args.sentences}", f"decoding.max_new_tokens={args.max_new_tokens}",
        "search.threshold=1000", "search.seed_from_store=false", f"output.store={args.store}",
        f"name=ground-truth-{args.model}", "resources.cpus_per_actor=1",
        f"search.options={{exhaustive: {{min_size: {args.min_size}, max_size: {max_size}, per_ask: 32}}}}"])
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {args.model} {msg}", flush=True)

    res = evaluate_all(cfg, passes, log)
    top = max_size or len([u for u in res["units"] if u not in res["protected"]]) - 1
    path = export(res, args.model, top, {
        "model": cfg.model.name, "dev": cfg.data.dev, "sentences_per_direction": args.sentences,
        "directions": cfg.data.directions, "max_new_tokens": args.max_new_tokens, "max_size": top,
        "built_with": "bench/bench_ground_truth.py (strategy exhaustive)", "actors": res["actors"]})
    log(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB); {res['computed']} computed in "
        f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
