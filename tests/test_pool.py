"""The evaluator pool: named actors, spreading work, and recovery from a dead actor."""

from __future__ import annotations

import os
import platform
import signal
import time

import ray

from cullmt_ray.candidate import Candidate
from cullmt_ray.data import load_devset
from cullmt_ray.config import ResourcesConfig as Resources
from cullmt_ray.evaluator import EvalSettings, EvaluatorPool, _cut, plan_actors
from cullmt_ray.config import ModelConfig


def test_actor_plan_leaves_cpu_for_trials(ray_cluster):
    n, cpu, gpu, threads = plan_actors(Resources())
    assert n == 2 and gpu == 0 and threads == 1
    assert n * cpu <= 2 - 0.1 + 1e-9  # some CPU stays free for the driver and Tune trials


def test_named_actors_and_recovery_from_a_killed_actor(ray_cluster, tiny_encdec):
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"]).subsample(60)
    pool = EvaluatorPool(ModelConfig(str(tiny_encdec)), ds, EvalSettings(spm="reference"),
                         Resources(actors=1), run="pooltest")
    try:
        node = pool.info[0]["node"]
        assert pool.names == [f"evaluator-{node[:8]}-pooltest-0"]  # node, run, slot
        assert ray.get_actor(pool.names[0]) is not None
        glibc = platform.libc_ver()[0] == "glibc" and os.environ.get("CULLMT_KEEP_HEAP", "1") != "0"
        assert pool.info[0]["heap_kept"] == glibc  # a CPU replica keeps freed blocks on glibc's heap
        pid = pool.info[0]["pid"]
        jobs = [(Candidate.of([u]), [("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn")])
                for u in ("enc.0", "dec.0", "dec.1")]
        results = {}
        it = pool.evaluate(jobs)
        time.sleep(1.5)  # the first job is running on the actor
        os.kill(pid, signal.SIGKILL)
        for cand, res in it:
            results[cand] = res
        assert set(results) == {c for c, _ in jobs}
        assert all(r["sentences"] == 120 for r in results.values())
        new_pid = ray.get(pool.actors[0].pid.remote())
        assert new_pid != pid  # Ray restarted the actor and retried its candidate
    finally:
        pool.shutdown()


def test_place_actors_spreads_packs_and_leaves_the_rest_to_ray(monkeypatch):
    from cullmt_ray import evaluator

    nodes = [{"NodeID": "b" * 56, "Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}},
             {"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "cullmt": 1.0}},
             {"NodeID": "c" * 56, "Alive": True, "Resources": {"CPU": 16.0}},  # no GPU: never gets a GPU actor
             {"NodeID": "d" * 56, "Alive": False, "Resources": {"CPU": 4.0, "GPU": 8.0}}]
    monkeypatch.setattr(evaluator.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(evaluator.ray, "get_runtime_context",
                        lambda: type("Ctx", (), {"get_node_id": lambda self: "b" * 56})())
    a, b = "a" * 56, "b" * 56
    gpu = {"CPU": 1.0, "GPU": 1.0}
    assert evaluator.place_actors(4, gpu, "spread") == [b, a, b, None]  # the driver's node first; 3 GPUs in all
    assert evaluator.place_actors(3, gpu, "pack") == [b, b, a]
    assert evaluator.place_actors(2, {"CPU": 1.0, "cullmt": 1.0}, "spread") == [a, None]


def test_a_run_of_sentences_is_cut_into_pieces_of_about_equal_weight():
    assert _cut(0, 8, 2) == [(0, 4), (4, 8)]  # no weights: equal lengths
    assert _cut(0, 10, 2, [5] + [1] * 9) == [(0, 3), (3, 10)]  # 7 and 7
    assert _cut(4, 8, 2, [9, 9, 9, 9, 1, 1, 1, 5]) == [(4, 7), (7, 8)]  # the weights of sentences 4..7 only
    assert _cut(0, 3, 3, [100, 1, 1]) == [(0, 1), (1, 2), (2, 3)]  # every piece keeps a sentence
    assert _cut(0, 2, 4, [1, 1]) == [(0, 1), (1, 2)]  # no more pieces than sentences


def test_whole_candidate_tasks_score_as_direction_tasks(ray_cluster, tiny_encdec):
    """With 2 actors, 3 candidates run as 2 whole-candidate tasks (all directions decoded together) and one
    candidate split into a task per direction: every candidate's scores equal those of its directions scored
    one by one on an actor."""
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn", "fra_Latn"]).subsample(30)
    pool = EvaluatorPool(ModelConfig(str(tiny_encdec)), ds, EvalSettings(spm="reference"),
                         Resources(actors=2), run="wholetest")
    try:
        dirs = [("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn"), ("fra_Latn", "deu_Latn")]
        cands = [Candidate.of(u) for u in (["enc.0"], ["dec.1"], ["enc.1", "dec.0"])]
        got = dict(pool.evaluate([(c, dirs) for c in cands]))
        assert set(got) == set(cands)
        for c in cands:
            alone = ray.get([pool.actors[0].evaluate.remote(c.units, [d]) for d in dirs])
            for m in ("spbleu", "chrf++", "bleu"):
                want = {k: v for part in alone for k, v in part["metrics"][m].items() if k != "mean"}
                assert {k: v for k, v in got[c]["metrics"][m].items() if k != "mean"} == want
            assert got[c]["sentences"] == 90
    finally:
        pool.shutdown()


def test_a_step_candidate_runs_where_its_base_set_left_its_states(ray_cluster, tiny_llama):
    """An actor keeps the states of what it decoded (prompt states per run of first layers): a free actor takes the
    task sharing the most first layers with what it ran on the same sentences, so a greedy step's candidate that
    keeps its base set's first layers runs where the base set ran, and the other actor takes one sharing least."""
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"]).subsample(8)
    pool = EvaluatorPool(ModelConfig(str(tiny_llama)), ds, EvalSettings(spm="reference"), Resources(actors=2),
                         run="placetest")
    try:
        assert pool.lockstep
        pool.lockstep = False  # one task per prune set, as for a family without a lockstep loop
        dirs = [("eng_Latn", "deu_Latn")]
        [(_, base)] = pool.sentence_stats([("base", ["layer.1"], dirs, 0, 4)], 8)
        # the step's candidates, in an order that would put layer.0 (sharing no first layer) on the first free actor:
        # layer.3 keeps the base set's first two layers (0 and 2), layer.2 one, layer.0 none
        jobs = [(u, ["layer.1", u], dirs, 0, 4) for u in ("layer.0", "layer.2", "layer.3")]
        got = dict(pool.sentence_stats(jobs, 8))
        assert got["layer.3"]["actor"] == base["actor"] and got["layer.0"]["actor"] != base["actor"]
        # other sentences: nothing kept anywhere, the calls run in order on the free actors
        got = dict(pool.sentence_stats([(u, ["layer.1", u], dirs, 4, 8) for u in ("layer.0", "layer.3")], 8))
        assert got["layer.0"]["actor"] == pool.names[0]
        # a round of three chunks on two actors: two whole, the one left over cut by sentences, one piece per actor
        # (all directions together), which put together in order are its chunk
        two = [("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn")]
        chunks = [(u, [u], two, 0, 8) for u in ("layer.0", "layer.2", "layer.3")]
        tasks = pool.race_tasks(chunks)
        cut = list(dict.fromkeys(k for k, *_, s, e in tasks if (s, e) != (0, 8)))
        halves = _cut(0, 8, 2, pool.weights(two))
        assert len(halves) == 2 and halves[0][0] == 0 and halves[0][1] == halves[1][0] and halves[1][1] == 8
        assert len(cut) == 1 and sorted((s, e) for k, _, d, s, e in tasks if k == cut[0] and d == two) == halves
        assert sorted(k for k, *_, s, e in tasks if (s, e) == (0, 8)) == sorted({u for u, *_ in chunks} - set(cut))
        pieces = sorted(pool.sentence_stats(tasks, 8), key=lambda kp: kp[1]["start"])
        whole = ray.get(pool.actors[0].sentence_stats.remote([cut[0]], two, 0, 8, 8))
        mine = [p for k, p in pieces if k == cut[0]]
        for i in range(len(two)):
            assert [x for p in mine for x in p["parts"][i]["stats"]] == whole["parts"][i]["stats"]
            assert [x for p in mine for x in p["parts"][i]["hyps"]] == whole["parts"][i]["hyps"]
    finally:
        pool.shutdown()


def test_racing_chunks_of_several_prune_sets_share_one_task_per_actor(ray_cluster, tiny_encdec):
    """Where actors decode in lockstep (encoder-decoder, greedy loop on CPU), the racing chunks of the same sentences
    go out as one task, decoding its prune sets together: every prune set's hypotheses and sentence statistics are
    those of its own task, and the chunks of other sentences still run on their own. A round's sentences are cut
    into one run per actor, each with every prune set; put together in order, the pieces are the whole chunk."""
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn", "fra_Latn"]).subsample(12)
    pool = EvaluatorPool(ModelConfig(str(tiny_encdec)), ds, EvalSettings(spm="reference"), Resources(actors=2),
                         run="locktest")
    try:
        assert pool.lockstep
        dirs = [("eng_Latn", "deu_Latn"), ("fra_Latn", "eng_Latn")]
        sets = [["enc.0"], ["dec.1"], ["enc.1", "dec.0"], ["dec.0", "dec.2"], []]
        jobs = [(i, r, dirs, 4, 8) for i, r in enumerate(sets)] + [("other", ["enc.2"], dirs, 0, 4)]
        assert sorted(len(g) for g in pool._groups(jobs)) == [1, 5]
        got = dict(pool.sentence_stats(jobs, 12))
        assert set(got) == {*range(len(sets)), "other"}
        for key, r, d, start, stop in jobs:
            alone = ray.get(pool.actors[1].sentence_stats.remote(r, d, start, stop, 12))
            assert got[key]["parts"] == alone["parts"] and got[key]["params"] == alone["params"], key
            assert got[key]["sentences"] == 8 and got[key]["start"] == start
        # a round cut for the actors: two runs of sentences, each with all five prune sets; the same statistics
        tasks = pool.race_tasks(jobs[:-1])
        (a, b), (c, d) = halves = _cut(4, 8, 2, pool.weights(dirs))
        assert a == 4 and b == c and d == 8 and sorted((s, e) for *_, s, e in tasks) == [halves[0]] * 5 + [halves[1]] * 5
        assert sorted(len(g) for g in pool._groups(tasks)) == [5, 5]
        pieces = sorted(pool.sentence_stats(tasks, 12), key=lambda kp: kp[1]["start"])
        for key, r, d, start, stop in jobs[:-1]:
            mine = [p for k, p in pieces if k == key]
            assert [p["start"] for p in mine] == [4, b]
            for i in range(len(dirs)):
                assert [x for p in mine for x in p["parts"][i]["stats"]] == got[key]["parts"][i]["stats"], key
                assert [x for p in mine for x in p["parts"][i]["hyps"]] == got[key]["parts"][i]["hyps"], key
    finally:
        pool.shutdown()


def test_fillers_run_on_an_idle_actor_and_are_taken_later(ray_cluster, tiny_llama):
    """A race round's fillers (a leader's next chunk) start only on an actor the round's tasks leave idle, are not
    waited for, and give the same statistics as the chunk's own task; a dropped filler frees its actor when it ends,
    and calls made meanwhile still all run."""
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"]).subsample(12)
    pool = EvaluatorPool(ModelConfig(str(tiny_llama)), ds, EvalSettings(spm="reference"), Resources(actors=2),
                         run="filltest")
    try:
        dirs = [("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn")]
        job = ("lead", ["layer.1"], dirs, 0, 4)
        fillers = [("lead", ["layer.1"], dirs, 4, 8), ("next", ["layer.0"], dirs, 4, 8)]
        got = dict(pool.sentence_stats([job], 12, fillers))
        assert set(got) == {"lead"} and got["lead"]["start"] == 0
        # one task for two actors: the other one took the first filler at once; the second ran only if the first
        # ended before the task did
        assert pool.holds(("lead", 4)) and not pool.holds(("lead", 0))
        for key, removed, d, s, e in fillers:
            if pool.holds((key, s)):
                alone = ray.get(pool.actors[0].sentence_stats.remote(removed, d, s, e, 12))
                assert pool.filled((key, s))["parts"] == alone["parts"], key
                assert not pool.holds((key, s))  # taken
        pool.sentence_stats([job], 12, [("gone", ["layer.2"], dirs, 4, 12)]).__next__()  # a filler, then dropped
        assert pool.holds(("gone", 4))
        pool.drop(("gone", 4))
        assert not pool.holds(("gone", 4))
        jobs = [(i, [f"layer.{i}"], dirs, 0, 4) for i in range(3)]
        assert sorted(k for k, _ in pool.sentence_stats(jobs, 12)) == [0, 1, 2]
        assert all(k is None for _, k in pool._held.values()) and not pool._filled  # only the dropped one, if running
    finally:
        pool.shutdown()
