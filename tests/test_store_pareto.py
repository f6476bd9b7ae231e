"""Results store (persistence, dedup) and Pareto export (non-dominated set, files load with pandas)."""

from __future__ import annotations

import pandas as pd
import pytest

from cullmt_ray.candidate import BASELINE, Candidate
from cullmt_ray.pareto import export_front, hypervolume, non_dominated
from cullmt_ray.candidate import Evaluation
from cullmt_ray.store import ResultStore


def ev(units, score, params):
    return Evaluation(Candidate.of(units), score, params, params * 4, {"bleu": {"a-b": score, "mean": score}}, 10, 0.1)


def test_candidate_key_is_canonical():
    assert Candidate.of(["dec.1", "enc.10", "enc.2"]).key == Candidate.of(["enc.2", "dec.1", "enc.10"]).key
    assert Candidate.of(["enc.2", "enc.10"]).units == ["enc.2", "enc.10"]
    assert BASELINE.key != Candidate.of(["enc.0"]).key


def test_store_persists_and_never_overwrites(store_url):
    s = ResultStore(store_url)
    ctx = s.register_context({"model": "m", "eval": 1})
    assert s.register_context({"eval": 1, "model": "m"}) == ctx  # key independent of order
    s.put(ctx, ev(["enc.0"], 10.0, 100))
    s.put(ctx, ev(["enc.0"], 99.0, 100))  # a second write of the same candidate is ignored
    s.close()
    s = ResultStore(store_url)
    got = s.get(ctx, Candidate.of(["enc.0"]))
    assert got.score == 10.0 and got.cached and s.count(ctx) == 1
    assert s.get(ctx, Candidate.of(["enc.1"])) is None
    assert s.get(s.register_context({"model": "other"}), Candidate.of(["enc.0"])) is None
    assert s.contexts() == [ctx, s.register_context({"model": "other"})]
    s.close()


def test_non_dominated_and_hypervolume():
    evals = [ev([], 30, 100), ev(["a.0"], 31, 90), ev(["a.1"], 20, 90), ev(["a.0", "a.1"], 25, 80),
             ev(["a.2"], 24, 85)]
    front = non_dominated(evals)
    assert [(e.params, e.score) for e in front] == [(80, 25), (90, 31)]
    # strips: [0.8, 0.9) at 25, [0.9, 1.0] at 31
    assert hypervolume(evals, 100) == pytest.approx(0.1 * 25 + 0.1 * 31)


def test_export_front_files_load_with_pandas(tmp_path):
    evals = [ev([], 30, 100), ev(["a.0"], 31, 90), ev(["a.1"], 20, 90), ev(["a.0", "a.1"], 25, 80)]
    files = export_front(evals, evals[0], tmp_path, "bleu", "t", {"greedy": [(100, 30), (90, 31)]})
    for key in ("csv", "json", "parquet", "png"):
        assert files[key].exists()
    df = pd.read_parquet(tmp_path / "pareto.parquet")
    assert list(df["params"]) == [80, 90] and list(df["score"]) == [25, 31]
    assert pd.read_csv(tmp_path / "pareto.csv")["removed_units"].tolist() == ["a.0 a.1", "a.0"]
    assert len(pd.read_json(tmp_path / "pareto.json")) == 2
    assert len(pd.read_parquet(tmp_path / "evaluations.parquet")) == 4
    assert not list(tmp_path.glob(".*.tmp"))
