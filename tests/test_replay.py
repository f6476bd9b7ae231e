"""Replay of strategies against ground-truth tables: a synthetic 6-unit table with a planted
optimum (greedy misses it), and the shipped tables. No model, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cullmt_ray.candidate import BASELINE, Candidate
from cullmt_ray.replay import TableError, Variant, evaluate_batch, load_table, replay, run_replay, run_study
from cullmt_ray.strategies import STRATEGIES, SearchSpace
from cullmt_ray.strategies.exhaustive import allowed_sets

REPO = Path(__file__).resolve().parents[1]
GROUND_TRUTH = REPO / "results" / "bench" / "ground_truth"
UNITS = ["enc.0", "enc.1", "enc.2", "dec.0", "dec.1", "dec.2"]
COST = {"enc.0": 5.0, "enc.1": 1.0, "enc.2": 1.2, "dec.0": 6.0, "dec.1": 1.1, "dec.2": 3.0}
PLANTED = frozenset({"enc.2", "dec.1"})  # removing both together costs 1.5 points less than apart


def score(removed: frozenset[str]) -> float:
    return 30.0 - sum(COST[u] for u in removed) + (1.5 if PLANTED <= removed else 0.0)


@pytest.fixture()
def table_path(tmp_path: Path) -> Path:
    """Every allowed set of 0..4 units; greedy takes enc.1 first and so misses {enc.2, dec.1} at size 2."""
    space = SearchSpace(UNITS)
    rows = []
    for c in [BASELINE, *allowed_sets(space, 1, 4)]:
        params = 2000 - sum(100 if u.startswith("enc") else 150 for u in c.removed)
        rows.append({"removed": " ".join(c.units), "n_removed": len(c), "params": params, "bytes": 4 * params,
                     "spbleu": score(c.removed), "kl": sum(COST[u] for u in c.removed) / 10, "seconds": 1.0,
                     "kl_seconds": 0.4})
    path = tmp_path / "synthetic.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def test_table_errors_name_the_file(tmp_path: Path, table_path: Path) -> None:
    with pytest.raises(TableError, match="nope.parquet: no such file"):
        load_table(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    pd.read_parquet(table_path).drop(columns=["params"]).to_parquet(bad)
    with pytest.raises(TableError, match="bad.parquet: missing column 'params'"):
        load_table(bad)
    with pytest.raises(TableError, match="metric='ter'"):
        load_table(table_path, "ter")


def test_exhaustive_asks_exactly_the_allowed_sets(table_path: Path) -> None:
    table = load_table(table_path)
    assert table.complete_sizes() == [1, 2, 3, 4]
    run = replay(table, "exhaustive", 4)
    asked = [t[0].candidate for t in run.told]
    assert len(asked) == len(set(asked)) == len(table.rows) - 1 == 6 + 15 + 18 + 9
    assert set(asked) == set(table.rows) - {BASELINE}
    assert all(table.space.allows(c) for c in asked)
    assert replay(table, "exhaustive", 4, budget=10).asked == 10


def test_replay_is_deterministic_per_seed(table_path: Path) -> None:
    table = load_table(table_path)
    for name in ("random", "evolutionary", "tpe", "nsga2", "hybrid", "greedy+kl=0.5"):
        a, b = replay(table, name, 3, seed=3, budget=12), replay(table, name, 3, seed=3, budget=12)
        assert [t[0].candidate for t in a.told] == [t[0].candidate for t in b.told], name
    runs = {tuple(t[0].candidate for t in replay(table, "random", 3, seed=s, budget=6).told) for s in range(4)}
    assert len(runs) > 1


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_budgets_are_respected(table_path: Path, name: str) -> None:
    table = load_table(table_path)
    run = replay(table, name, 3, seed=1, budget=7)
    assert run.asked <= 7 and len(run.told) <= 7


def test_kl_stage_decodes_the_kept_fraction(table_path: Path) -> None:
    table = load_table(table_path)
    batch = [Candidate.of([u]) for u in UNITS[:4]]
    out = evaluate_batch(table, batch, keep=0.5)
    assert [full for _, full in out] == [False, True, True, False]  # enc.1, enc.2 have the lowest KL
    assert out[0][0].score == pytest.approx(-0.5)


def test_exact_method_has_zero_regret_and_greedy_misses_the_planted_optimum(table_path: Path) -> None:
    table = load_table(table_path)
    assert table.optimal_sets(2) == [Candidate(PLANTED)]
    report = run_study(table, [Variant("greedy", "greedy"), Variant("exhaustive", "exhaustive")], seeds=2,
                       sizes=[1, 2, 3], budget=200, log=lambda _: None)
    for k in ("1", "2", "3"):
        assert report["results"]["exhaustive"]["sizes"][k]["regret"]["median"] == 0
    assert report["results"]["greedy"]["sizes"]["2"]["regret"]["median"] == pytest.approx(1.3)
    wrong = report["greedy_analysis"][1]
    assert wrong["greedy"] == ["enc.1", "dec.1"] and not wrong["optimum_extends_previous_step"]


def test_hybrid_finds_the_planted_optimum_greedy_misses(table_path: Path) -> None:
    table = load_table(table_path)
    greedy, hybrid = replay(table, "greedy", 2), replay(table, "hybrid", 2)
    assert greedy.trace["final"] == ["enc.1", "dec.1"]
    assert hybrid.trace["final"] == ["enc.2", "dec.1"]
    assert max(e.score for e, _, _ in hybrid.full if len(e.candidate) == 2) == pytest.approx(table.optimum(2))


def test_run_replay_writes_the_report(tmp_path: Path, table_path: Path) -> None:
    out = run_replay(table_path, ["hybrid", "random"], seeds=3, sizes=[1, 2], out_dir=tmp_path / "r",
                     log=lambda _: None)
    report = json.loads((out / "replay.json").read_text())
    assert list(report["results"]) == ["greedy", "hybrid", "random"]
    assert report["greedy_budget"] == {"1": 6, "2": 11}
    assert set(report["target"]) == {"greedy", "hybrid", "random"}
    assert (out / "replay.png").stat().st_size > 0 and "Where greedy goes wrong" in (out / "replay.md").read_text()
    with pytest.raises(TableError, match="sizes: 5"):
        run_replay(table_path, ["greedy"], seeds=1, sizes=[5], out_dir=tmp_path / "r")


def test_replay_imports_neither_torch_nor_ray() -> None:
    code = "import sys, cullmt_ray.replay; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", ["llama", "dense"])
def test_shipped_tables_load_with_pandas_alone(name: str) -> None:
    path = GROUND_TRUTH / f"{name}.parquet"
    df = pd.read_parquet(path)
    meta = json.loads((GROUND_TRUTH / f"{name}.json").read_text())
    space = SearchSpace(meta["units"], frozenset(meta["protected"]))
    counts = df["n_removed"].value_counts().to_dict()
    assert counts[0] == 1
    for k in meta["complete_sizes"]:
        assert counts[k] == sum(1 for _ in allowed_sets(space, k, k))
    assert set(meta["complete_sizes"]) >= ({1, 2, 3, 4, 5} if name == "llama" else {1, 2, 3, 4})
    assert {"removed", "n_removed", "params", "bytes", "spbleu", "chrf++", "kl"} <= set(df.columns)
    assert path.stat().st_size < 1_000_000


def test_hybrid_reaches_the_target_size_within_greedys_budget(table_path: Path) -> None:
    table = load_table(table_path)
    for k in (2, 3, 4):
        budget = replay(table, "greedy", k).asked
        run = replay(table, "hybrid", k, budget=budget)
        assert run.asked <= budget and run.trace["final"] and len(run.trace["final"]) == k


def test_compare_seeds_aggregates_per_strategy() -> None:
    from cullmt_ray.compare_seeds import aggregate, markdown

    def report(best: float, hv: float, hit: int | None) -> dict:
        return {"target_removed": 2, "strategies": [
            {"strategy": "greedy", "best_by_size": {"2": 30.0}, "hypervolume_at_budget": 7.0, "computed": 5},
            {"strategy": "tpe", "best_by_size": {"2": best}, "hypervolume_at_budget": hv, "computed": 3,
             "evaluations_to_match_greedy": hit}]}

    out = aggregate([report(29.0, 6.0, None), report(30.5, 8.0, 4), report(30.0, 7.0, 6)])
    assert out["tpe"]["best_at_size"]["median"] == 30.0 and out["tpe"]["matched_greedy"] == 2
    assert out["tpe"]["evaluations_to_match_greedy"]["median"] == 5 and out["greedy"]["computed"] == 15
    text = markdown({"model": "m", "seeds": 3, "target_removed": 2, "budget": 5, "strategies": out})
    assert "| tpe | 30.0 [29.5, 30.25]" in text


def test_hybrid_without_a_target_stops_at_the_threshold(table_path: Path) -> None:
    from cullmt_ray.strategies import build_strategy
    from cullmt_ray.strategies import StopRule

    table = load_table(table_path)
    strategy = build_strategy("hybrid", table.space, StopRule(threshold=1.0), options={"extend": 2})
    while batch := strategy.ask():
        strategy.tell([table.evaluate(c) for c in batch])
    trace = strategy.trace()
    assert trace["final"] == ["enc.2", "dec.1"]  # the planted pair (drop 0.8); any third unit drops > 1 point
    assert "threshold" in trace["stop_reason"]


def test_kl_stage_variants_skip_sizes_without_kl(tmp_path: Path, table_path: Path) -> None:
    df = pd.read_parquet(table_path)
    df.loc[df["n_removed"] == 3, "kl"] = None
    partial = tmp_path / "partial.parquet"
    df.to_parquet(partial, index=False)
    out = run_replay(partial, ["greedy+kl=0.5"], seeds=2, sizes=[2, 3], out_dir=tmp_path / "p", log=lambda _: None)
    report = json.loads((out / "replay.json").read_text())
    sizes = report["results"]["greedy+kl=0.5"]["sizes"]
    assert sizes["2"]["seeds"] == 2 and sizes["3"]["skipped"]
    assert report["target"]["greedy+kl=0.5"]["sizes_judged"] == [2] and not report["target"]["greedy+kl=0.5"]["met"]


def test_compare_replays_the_shipped_table_from_the_cli(tmp_path):
    """`cullmt-ray compare --table`: the shipped llama table, where greedy is exact (regret 0 at every size)."""
    import json

    from cullmt_ray.cli import main

    table = Path(__file__).resolve().parents[1] / "results/bench/ground_truth/llama.parquet"
    assert main(["compare", "--table", str(table), "--seeds", "2", "--strategies", "greedy,random",
                 "--sizes", "1,2", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "replay-llama" / "replay.json").read_text())
    greedy = report["results"]["greedy"]["sizes"]
    assert report["sizes"] == [1, 2] and all(greedy[k]["regret"]["median"] == 0 for k in ("1", "2"))
    assert (tmp_path / "replay-llama" / "replay.md").exists()
    assert main(["compare", "--table", str(tmp_path / "none.parquet"), "--strategies", "greedy"]) == 2


def test_threshold_runs_compare_the_default_stop_rule_with_the_exact_optimum(tmp_path: Path, table_path: Path) -> None:
    """Without a size target greedy stops on its own path (enc.1 first) while hybrid ends on the
    planted pair; both are judged against the exact optimum of their final size; a measured KL
    cost replaces the table's seconds ratio in the cost columns."""
    out = run_replay(table_path, ["hybrid", "tpe"], seeds=1, sizes=[1, 2], out_dir=tmp_path / "t",
                     log=lambda _: None, proxy_cost=0.1, proxy_source="measured here")
    report = json.loads((out / "replay.json").read_text())
    runs = {(r["threshold"], r["strategy"]): r for r in report["threshold_runs"]}
    assert not any(s == "tpe" for _, s in runs)  # fixed-size strategies need a size target
    greedy, hybrid = runs[(1.0, "greedy")], runs[(1.0, "hybrid")]
    assert hybrid["final"] == ["enc.2", "dec.1"] and hybrid["regret"] == 0.0
    assert greedy["size"] == 1 and greedy["deepest_within_threshold"] == 2
    assert report["proxy_cost"] == 0.1 and report["proxy_cost_source"] == "measured here"
    text = (out / "replay.md").read_text()
    assert "0.1 x KL-stage evaluations (measured here" in text and "| 1.0 | hybrid | enc.2 dec.1 | 2 (2) |" in text
    with pytest.raises(TableError, match="proxy_cost=-1"):
        run_replay(table_path, ["hybrid"], seeds=1, sizes=[1], out_dir=tmp_path / "u", proxy_cost=-1)
