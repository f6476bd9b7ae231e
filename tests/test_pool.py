"""The evaluator pool: named actors, spreading work, and recovery from a dead actor."""

from __future__ import annotations

import os
import signal
import time

import ray

from cullmt_ray.candidate import Candidate
from cullmt_ray.data import load_devset
from cullmt_ray.evaluator import EvalSettings, EvaluatorPool, Resources, plan_actors
from cullmt_ray.families import ModelSpec


def test_actor_plan_leaves_cpu_for_trials(ray_cluster):
    n, cpu, gpu, threads = plan_actors(Resources())
    assert n == 2 and gpu == 0 and threads == 1
    assert n * cpu <= 2 - 0.1 + 1e-9  # some CPU stays free for the driver and Tune trials


def test_named_actors_and_recovery_from_a_killed_actor(ray_cluster, tiny_encdec):
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"]).subsample(60)
    pool = EvaluatorPool(ModelSpec(str(tiny_encdec)), ds, EvalSettings(spm="reference"),
                         Resources(actors=1), run="pooltest")
    try:
        assert ray.get_actor("evaluator-pooltest-0") is not None
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
