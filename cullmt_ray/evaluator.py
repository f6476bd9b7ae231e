"""Ray actors that hold one model replica each and score candidates; the pool around them.

An actor loads its model once, then for each candidate applies the prune set (no weight
copies), decodes every direction of the evaluation set (batched, length-sorted, greedy or
beam) and scores it with sacrebleu. Actors are named (``evaluator-<run>-<slot>``) so the Ray
dashboard shows them; Ray restarts a dead actor and retries its candidate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import ray

from .candidate import Candidate
from .data import DevSet, Direction, direction_name
from .families import Decoding, ModelSpec, load_family
from .metrics import Scorer


@dataclass(frozen=True)
class EvalSettings:
    """How candidates are scored; everything here is part of the store's context."""

    metric: str = "spbleu"  # the primary metric the search optimises
    metrics: tuple[str, ...] = ("spbleu", "chrf++", "bleu")
    spm: str = "flores200"
    decoding: Decoding = Decoding()


class EvaluatorActor:
    """One model replica. Created through :class:`EvaluatorPool` as a Ray actor."""

    def __init__(self, spec: ModelSpec, devset: DevSet, settings: EvalSettings, threads: int, name: str):
        import torch

        torch.set_num_threads(max(1, threads))
        self.name = name
        self.family = load_family(spec)
        self.devset = devset
        self.settings = settings
        self.scorer = Scorer(spm=settings.spm, metrics=settings.metrics)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "units": self.family.units(), "size": asdict(self.family.size()),
                "family": self.family.name, "signatures": self.scorer.signatures()}

    def evaluate(self, removed: list[str], directions: list[Direction], limit: int | None = None) -> dict:
        """Score a prune set on ``directions``, on the first ``limit`` sentences (all when None)."""
        t0 = time.perf_counter()
        per_direction: dict[str, dict[str, float]] = {}
        n = len(self.devset) if limit is None else min(limit, len(self.devset))
        with self.family.apply(removed):
            for src, tgt in directions:
                hyps = self.family.translate(list(self.devset.lines[src][:n]), src, tgt, self.settings.decoding)
                per_direction[direction_name((src, tgt))] = self.scorer.score(hyps, list(self.devset.lines[tgt][:n]))
        metrics = {}
        for m in self.settings.metrics:
            scores = {d: s[m] for d, s in per_direction.items()}
            metrics[m] = {**scores, "mean": round(sum(scores.values()) / len(scores), 4)}
        size = self.family.size(removed)
        return {"score": metrics[self.settings.metric]["mean"], "metrics": metrics, "params": size.params,
                "bytes": size.bytes, "sentences": n * len(directions),
                "seconds": time.perf_counter() - t0, "actor": self.name}

    def proxies(self, units: list[str], directions: list[Direction], batch_size: int = 16) -> dict:
        """Teacher-forced importance proxies (KL to the full model, angular distance) per unit."""
        from .proxies import proxy_scores

        t0 = time.perf_counter()
        batches = []
        for src, tgt in directions:
            s, t = list(self.devset.lines[src]), list(self.devset.lines[tgt])
            for i in range(0, len(s), batch_size):
                batches.append(self.family.teacher_forced(s[i : i + batch_size], t[i : i + batch_size], src, tgt))
        out = proxy_scores(self.family, batches, units)
        return {**out, "seconds": time.perf_counter() - t0, "sentences": len(self.devset) * len(directions)}

    def translate(self, removed: list[str], sources: list[str], src: str, tgt: str) -> list[str]:
        with self.family.apply(removed):
            return self.family.translate(sources, src, tgt, self.settings.decoding)

    def pid(self) -> int:
        return os.getpid()


def merge_results(parts: list[dict], metric: str) -> dict:
    """One candidate's result from its per-direction results: means recomputed, costs summed."""
    metrics: dict[str, dict[str, float]] = {}
    for part in parts:
        for m, per in part["metrics"].items():
            metrics.setdefault(m, {}).update({d: v for d, v in per.items() if d != "mean"})
    for m, per in metrics.items():
        ordered = dict(sorted(per.items()))
        metrics[m] = {**ordered, "mean": round(sum(ordered.values()) / len(ordered), 4)}
    first = parts[0]
    return {"score": metrics[metric]["mean"], "metrics": metrics, "params": first["params"],
            "bytes": first["bytes"], "sentences": sum(p["sentences"] for p in parts),
            "seconds": sum(p["seconds"] for p in parts),
            "actor": ",".join(sorted({p["actor"] for p in parts}))}


@dataclass(frozen=True)
class Resources:
    """How many actors and what each reserves. ``None`` means: decide from the cluster."""

    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    reserve_cpus: float = 0.1  # left free for the driver and light Ray Tune trials


def plan_actors(res: Resources) -> tuple[int, float, float, int]:
    """(actors, num_cpus per actor, num_gpus per actor, torch threads per actor) for this cluster."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    gpa = res.gpus_per_actor if res.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if res.actors is not None:
        n = res.actors
    elif gpa > 0:
        n = max(1, int(gpus // gpa))
    else:
        n = max(1, int(cpus // res.cpus_per_actor))
    # Never reserve every CPU: Tune trials and the driver's tasks must still schedule.
    per_actor_cpu = max(0.01, min(res.cpus_per_actor, (cpus - res.reserve_cpus) / n))
    threads = max(1, int(round(res.cpus_per_actor)))
    return n, per_actor_cpu, gpa, threads


class EvaluatorPool:
    """A set of evaluator actors; spreads candidates over them and yields results as they finish."""

    def __init__(self, spec: ModelSpec, devset: DevSet, settings: EvalSettings, resources: Resources = Resources(),
                 run: str = "run"):
        n, cpu, gpu, threads = plan_actors(resources)
        # Held for the pool's lifetime: a restarted actor re-reads its constructor arguments
        # from the object store (ray-project/ray#53727).
        self._devset_ref = ray.put(devset)
        cls = ray.remote(EvaluatorActor)
        self.names = [f"evaluator-{run}-{i}" for i in range(n)]
        self.actors = [
            cls.options(name=name, num_cpus=cpu, num_gpus=gpu, max_restarts=3, max_task_retries=3,
                        max_concurrency=1).remote(spec, self._devset_ref, settings, threads, name)
            for name in self.names
        ]
        self.info = ray.get([a.ready.remote() for a in self.actors])
        self.metric = settings.metric

    @property
    def size(self) -> int:
        return len(self.actors)

    def evaluate(self, jobs: Iterable[tuple[Candidate, list[Direction]]],
                 limit: int | None = None) -> Iterator[tuple[Candidate, dict]]:
        """Yield ``(candidate, result)`` as candidates complete.

        Each candidate is split into one task per direction, so that every actor stays busy even
        when there are fewer candidates than actors (the baseline, a final held-out check); an
        actor runs one task at a time. A candidate's result is its tasks' results merged.
        """
        pending: list[tuple[Candidate, Direction]] = [(c, d) for c, dirs in jobs for d in dirs][::-1]
        parts_left: dict[Candidate, int] = {}
        parts: dict[Candidate, list[dict]] = {}
        for c, _ in pending:
            parts_left[c] = parts_left.get(c, 0) + 1
        running: dict[ray.ObjectRef, tuple[int, Candidate]] = {}
        free = list(range(len(self.actors)))
        while pending or running:
            while pending and free:
                i = free.pop(0)
                cand, direction = pending.pop()
                running[self.actors[i].evaluate.remote(cand.units, [direction], limit)] = (i, cand)
            done, _ = ray.wait(list(running), num_returns=1)
            i, cand = running.pop(done[0])
            free.append(i)
            parts.setdefault(cand, []).append(ray.get(done[0]))
            parts_left[cand] -= 1
            if parts_left[cand] == 0:
                yield cand, merge_results(parts.pop(cand), self.metric)

    def proxies(self, units: list[str], directions: list[Direction]) -> dict:
        """Importance proxies for ``units`` (see :mod:`cullmt_ray.proxies`), units spread over the actors."""
        shares = [units[i :: self.size] for i in range(self.size)]
        parts = ray.get([a.proxies.remote(share, directions) for a, share in zip(self.actors, shares) if share])
        return {"kl": {u: p["kl"][u] for p in parts for u in p["kl"]},
                "angle": {u: p["angle"][u] for p in parts for u in p["angle"]},
                "seconds": sum(p["seconds"] for p in parts), "sentences": parts[0]["sentences"]}

    def translate(self, removed: list[str], sources: list[str], src: str, tgt: str) -> list[str]:
        """Translate with the first actor (used for reports and, later, KD data)."""
        return ray.get(self.actors[0].translate.remote(removed, sources, src, tgt))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
