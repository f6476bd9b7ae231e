"""Every strategy behind BaseStrategy: known optima, budgets, no repeats; compare on Ray.

The pure tests drive strategies with a scoring function whose optimum is known by construction
(additive harms plus one interaction that makes greedy's first step a trap); the Ray tests run
them through the real pool and store on tiny and reference models.
"""

from __future__ import annotations

import json

import pytest

from cullmt_ray.candidate import Candidate
from cullmt_ray.config import ConfigError, load_config
from cullmt_ray.search import run_search
from cullmt_ray.strategies import make_strategy
from cullmt_ray.candidate import Evaluation
from cullmt_ray.store import ResultStore
from cullmt_ray.strategies import STRATEGIES, SearchSpace, StopRule, StrategyError

from .conftest import search_config, write_self_reference_devset

UNITS = [f"enc.{i}" for i in range(5)] + [f"dec.{i}" for i in range(5)]
HARM = {"enc.4": 0.1, "enc.0": 1.0, "dec.0": 1.0} | {u: 5.0 + i for i, u in enumerate(UNITS)
                                                        if u not in ("enc.4", "enc.0", "dec.0")}
OPTIMUM = Candidate.of(["enc.0", "dec.0"])  # alone each costs 1.0; together only 0.05


def score(c: Candidate) -> float:
    s = 100.0 - sum(HARM[u] for u in c.removed)
    if OPTIMUM.removed <= c.removed:
        s += 1.95
    return round(s, 4)


def drive(strategy, fn=score) -> list[Candidate]:
    asked: list[Candidate] = []
    while batch := strategy.ask():
        asked += batch
        strategy.tell([Evaluation(c, fn(c), 1000 - 10 * len(c), 4000 - 40 * len(c), {}, 1, 0.0) for c in batch])
    return asked


def make(name: str, size: int | None = 2, budget: int | None = None, **opts):
    space = SearchSpace(UNITS, frozenset(), 100.0, 1000)
    return STRATEGIES[name](space=space, stop=StopRule(threshold=50.0, target_removed=size, max_evaluations=budget),
                            seed=0, **opts)


def test_greedy_falls_into_the_trap_and_beam_does_not():
    greedy = make("greedy")
    drive(greedy)
    assert Candidate.of(greedy.trace()["final"]) != OPTIMUM  # it takes enc.4 first
    beam = make("beam", width=3)
    drive(beam)
    assert Candidate.of(beam.trace()["final"]) == OPTIMUM


# 45 sets of size 2; the multi-objective ones search sizes 1..2 (55 sets) for the whole front.
@pytest.mark.parametrize(("name", "budget"), [("evolutionary", 20), ("tpe", 20), ("nsga2", 50), ("motpe", 50)])
def test_sampling_strategies_find_the_optimum_within_budget(name, budget):
    s = make(name, budget=budget)
    asked = drive(s)
    assert len(asked) <= budget and len(set(asked)) == len(asked)
    assert s.best(2)["removed"] == OPTIMUM.units
    if name in ("nsga2", "motpe"):
        front = s.trace()["study_front"]
        assert [f["removed"] for f in front] == [OPTIMUM.units]  # it beats every size-1 set on both objectives


def test_random_spends_exactly_its_budget_without_repeats_and_is_exhaustive_when_allowed():
    s = make("random", budget=12)
    asked = drive(s)
    assert len(asked) == 12 == len(set(asked)) and all(len(c) == 2 for c in asked)
    s = make("random", budget=100)
    asked = drive(s)
    assert len(asked) == 45 and OPTIMUM in asked  # every size-2 set, once
    assert s.stop_reason == "every prune set of that size tried"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_no_strategy_empties_a_stack_or_removes_a_protected_unit(name):
    units = ["enc.0", "enc.1", "dec.0", "dec.1", "dec.2"]
    space = SearchSpace(units, frozenset({"dec.2"}), 100.0, 1000)
    s = STRATEGIES[name](space=space, stop=StopRule(threshold=100.0, target_removed=2, max_evaluations=40), seed=1)
    for c in drive(s, fn=lambda c: 100.0 - len(c)):
        assert space.allows(c) and "dec.2" not in c.removed


def test_seeding_starts_evolution_from_the_best_known_set():
    s = make("evolutionary", budget=4)
    seed = Evaluation(OPTIMUM, score(OPTIMUM), 980, 3920, {}, 1, 0.0)
    s.seed_with([seed])
    assert s.parent == OPTIMUM
    drive(s)
    assert s.parent == OPTIMUM  # no mutant beats it


def test_tpe_seeded_with_the_optimum_knows_it_without_spending():
    s = make("tpe", budget=3)
    s.seed_with([Evaluation(OPTIMUM, score(OPTIMUM), 980, 3920, {}, 1, 0.0)])
    assert len(s.study.trials) == 1 and s.study.best_value == score(OPTIMUM)
    assert OPTIMUM not in drive(s)


def test_fixed_size_strategies_need_a_size_and_options_are_checked(tmp_path):
    with pytest.raises(StrategyError, match="target_removed=None"):
        make("tpe", size=None).ask()
    base = Evaluation(Candidate.of([]), 100.0, 1000, 4000, {}, 1, 0.0)
    with pytest.raises(ConfigError, match=r"search.options.beam.widht: not an option of strategy 'beam'"):
        load_config(None, ["search.strategy=beam", "search.options={beam: {widht: 2}}"])
    with pytest.raises(StrategyError, match=r"search.protect: 'enc.9' is not a unit"):
        make_strategy(load_config(None, ["search.protect=enc.9"]).search, UNITS, base)
    with pytest.raises(ConfigError, match="search.strategy='annealing'"):
        load_config(None, ["search.strategy=annealing"])


config = search_config


@pytest.mark.parametrize("name", ["beam", "evolutionary", "tpe", "nsga2"])
def test_strategies_find_the_identity_layers_on_ray(ray_cluster, tiny_encdec, demo_sources, tmp_path, name):
    dev = write_self_reference_devset(tiny_encdec, tmp_path / "dev", demo_sources)
    run = run_search(config(tmp_path, tiny_encdec, dev, search__strategy=name, search__target_removed=2,
                            search__max_evaluations=12))
    trace = json.loads((run / "trace.json").read_text())
    assert sorted(trace["final"]) == ["dec.2", "enc.1"]  # the only size-2 set scoring 100
    assert trace["evaluations"] <= 12
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["budget"]["evaluations"] <= 13  # + baseline


def test_compare_shares_the_store_and_writes_the_report(ray_cluster, tiny_encdec, demo_sources, tmp_path):
    from cullmt_ray.compare import run_compare

    dev = write_self_reference_devset(tiny_encdec, tmp_path / "dev", demo_sources)
    cfg = config(tmp_path, tiny_encdec, dev)
    out = run_compare(cfg, ["random", "greedy", "beam", "evolutionary", "tpe", "nsga2"])
    report = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in report["strategies"]][0] == "greedy"  # greedy runs first, sets the budget
    ref = report["greedy_reference"]
    assert sorted(ref["removed"]) == ["dec.2", "enc.1"] and ref["evaluations"] == 15 == report["budget"]
    for r in report["strategies"]:
        assert r["evaluations"] <= 15
        assert r["best_by_size"]["2"] == 100.0, r["strategy"]
        if r["strategy"] != "greedy":
            assert r["evaluations_to_match_greedy"] is not None
    store = ResultStore(tmp_path / "store.sqlite")
    try:
        rows = store.db.execute("SELECT COUNT(*), COUNT(DISTINCT candidate) FROM evaluations").fetchone()
    finally:
        store.close()
    assert rows[0] == rows[1]  # no candidate computed twice across strategies
    for f in ("compare.md", "fronts.png", "progress.png", "config.yaml"):
        assert (out / f).stat().st_size > 0
    assert "| greedy |" in (out / "compare.md").read_text()


def test_compare_on_the_reference_model_with_a_small_budget(ray_cluster, tmp_path):
    from cullmt_ray.compare import run_compare

    cfg = load_config(None, ["data.directions=eng_Latn-deu_Latn", "data.max_sentences=12", "search.target_removed=1",
                             f"output.dir={tmp_path / 'runs'}", f"output.store={tmp_path / 'store.sqlite'}",
                             "resources.actors=2", "name=ref"])
    out = run_compare(cfg, ["greedy", "tpe", "random"], budget=4)
    report = json.loads((out / "compare.json").read_text())
    assert report["model"] == "reference:dense" and report["budget"] == 4
    assert [r["evaluations"] for r in report["strategies"]] == [4, 4, 4]
    assert all(set(r["best_by_size"]) == {"1"} for r in report["strategies"])
    assert "tok:spm[multi30k_spm.model" in report["signature"]
    assert (out / "fronts.png").stat().st_size > 0 and (out / "progress.png").stat().st_size > 0


def test_calibration_study_scores_every_choice_on_all_directions(ray_cluster, tmp_path):
    from cullmt_ray.calibration import run_calibration_study

    cfg = load_config(None, ["data.languages=[eng_Latn, deu_Latn, fra_Latn]", "data.max_sentences=6",
                             "search.target_removed=1", "search.threshold=100", f"output.dir={tmp_path / 'runs'}",
                             f"output.store={tmp_path / 'store.sqlite'}", "resources.actors=2", "name=cal",
                             "search.protect=[enc.0, enc.1, enc.2, enc.3, enc.4, dec.0, dec.1, dec.2, dec.3]"])
    out = run_calibration_study(cfg, ["all", "from-english", "into:fra_Latn"])
    report = json.loads((out / "calibration.json").read_text())
    rows = {r["calibration"]: r for r in report["calibrations"]}
    assert rows["from-english"]["directions"] == ["eng_Latn-deu_Latn", "eng_Latn-fra_Latn"]
    assert rows["from-english"]["heldout_directions"] == ["deu_Latn-eng_Latn", "fra_Latn-eng_Latn"]
    assert rows["into:fra_Latn"]["directions"] == ["eng_Latn-fra_Latn"] and rows["all"]["heldout_score"] is None
    for r in rows.values():
        assert len(r["removed"]) == 1 and r["evaluations"] == 3  # enc.5, dec.4, dec.5 are the only choices
        assert set(r["per_direction"]) == {"eng_Latn-deu_Latn", "deu_Latn-eng_Latn", "eng_Latn-fra_Latn",
                                           "fra_Latn-eng_Latn"}
        pruned = sum(v["pruned"] for v in r["per_direction"].values()) / 4
        assert abs(pruned - r["all_score"]) < 1e-3
    assert (out / "calibration.png").stat().st_size > 0 and "| from-english | 2 |" in (out / "calibration.md").read_text()


def test_calibration_choices_select_configured_directions():
    from cullmt_ray.data import DataError, parse_directions, select_directions

    langs = ["eng_Latn", "deu_Latn", "ces_Latn"]
    conf = parse_directions("english-centric", langs)
    assert select_directions("to-english", conf, langs) == [("deu_Latn", "eng_Latn"), ("ces_Latn", "eng_Latn")]
    assert select_directions("from:cs", conf, langs) == [("ces_Latn", "eng_Latn")]
    assert select_directions("en-de", conf, langs) == [("eng_Latn", "deu_Latn")]
    with pytest.raises(DataError, match="deu_Latn-ces_Latn is not among the configured directions"):
        select_directions("de-cs", conf, langs)
    with pytest.raises(DataError, match="'into:fra_Latn': selects no configured direction"):
        select_directions("into:fra_Latn", conf, langs)


@pytest.mark.parametrize("name", ["greedy", "tpe"])
def test_strategies_run_as_ray_tune_searchers(ray_cluster, tiny_encdec, demo_sources, tmp_path, name):
    dev = write_self_reference_devset(tiny_encdec, tmp_path / "dev", demo_sources)
    extra = {"search__driver": "tune", "search__strategy": name, "search__target_removed": 2,
             "search__max_evaluations": 12}
    run = run_search(config(tmp_path, tiny_encdec, dev, **extra))
    trace = json.loads((run / "trace.json").read_text())
    assert sorted(trace["final"]) == ["dec.2", "enc.1"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["budget"]["evaluations"] == trace["evaluations"] + 1
    trials = list((run / "tune").rglob("result.json"))
    assert len(trials) == trace["evaluations"]  # one Tune trial per new candidate, each with its result
    store = ResultStore(tmp_path / "store.sqlite")
    try:
        assert store.count(info["context"]) == trace["evaluations"] + 1
    finally:
        store.close()


def test_two_stage_scoring_finds_the_same_answer_for_fewer_sentences(ray_cluster, tiny_encdec, demo_sources,
                                                                        tmp_path):
    dev = write_self_reference_devset(tiny_encdec, tmp_path / "dev", demo_sources)
    run = run_search(config(tmp_path, tiny_encdec, dev, search__fidelity__sentences=4, search__fidelity__keep=0.5))
    trace = json.loads((run / "trace.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert sorted(trace["final"]) == ["dec.2", "enc.1"]
    n = len(demo_sources)
    # baseline + per step: every option on 4 sentences, the best half on all n (plain greedy: 16 * n)
    assert info["budget"]["sentences"] == n + (6 + 5 + 4) * 4 + (3 + 3 + 2) * n < 16 * n
    store = ResultStore(tmp_path / "store.sqlite")
    try:
        contexts = store.db.execute("SELECT description FROM contexts").fetchall()
    finally:
        store.close()
    assert sorted(json.loads(d).get("first_sentences", 0) for (d,) in contexts) == [0, 4]


def test_kl_proxy_stage_finds_the_same_answer_decoding_fewer_candidates(ray_cluster, tiny_encdec, demo_sources,
                                                                         tmp_path):
    dev = write_self_reference_devset(tiny_encdec, tmp_path / "dev", demo_sources)
    run = run_search(config(tmp_path, tiny_encdec, dev, search__fidelity__proxy="kl", search__fidelity__keep=0.5))
    trace = json.loads((run / "trace.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert sorted(trace["final"]) == ["dec.2", "enc.1"]
    n = len(demo_sources)
    # baseline + per step only the best half by KL is decoded (plain greedy: 16 * n)
    assert info["budget"]["sentences"] == n + (3 + 3 + 2) * n
    store = ResultStore(tmp_path / "store.sqlite")
    try:
        contexts = {json.loads(d).get("proxy"): c for c, d in store.db.execute("SELECT context, description FROM contexts")}
        assert set(contexts) == {None, "kl"}
        proxy_scores = [e.score for e in store.evaluations(contexts["kl"])]
    finally:
        store.close()
    assert len(proxy_scores) == 6 + 5 + 4 and all(s <= 0 for s in proxy_scores)  # negated KL, one per option
