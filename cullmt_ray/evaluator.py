"""Ray actors that hold one model replica each and score candidates; the pool around them.

An actor loads its model once, then for each candidate applies the prune set (no weight
copies), decodes every direction of the evaluation set (batched, length-sorted, greedy or
beam) and scores it with sacrebleu. Actors are named ``evaluator-<node>-<run>-<slot>`` (``<node>``: the
first 8 hex digits of the Ray node id the pool placed it on, ``any`` where Ray places it) so the
Ray dashboard shows where each one runs and concurrent runs never clash; Ray restarts a dead actor
and retries its candidate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from .candidate import Candidate
from .config import Decoding, ModelConfig, ResourcesConfig
from .data import DevSet, Direction, direction_name
from .evaluation import RunError
from .heap import keep_heap
from .metrics import METRICS, Scorer


KL_CACHE_MIB = 512  # the full model's KL targets kept per actor (least recently used dropped beyond)


@dataclass(frozen=True)
class EvalSettings:
    """How candidates are scored; everything here is part of the store's context."""

    metric: str = "spbleu"  # the primary metric the search optimises
    metrics: tuple[str, ...] = ("spbleu", "chrf++", "bleu")
    spm: str = "flores200"
    decoding: Decoding = Decoding()
    # Decode the dev set in blocks of this many sentences (in dev-set order; each block length-sorted
    # and batched on its own), so that a racing chunk decodes exactly as a full evaluation does.
    block: int | None = None


class EvaluatorActor:
    """One model replica. Created through :class:`EvaluatorPool` as a Ray actor."""

    def __init__(self, spec: ModelConfig, devset: DevSet, settings: EvalSettings, threads: int, name: str):
        import torch

        from .families import load_family  # here, not on the driver: it imports torch and transformers

        torch.set_num_threads(max(1, threads))
        self.name = name
        self.family = load_family(spec)
        self.heap_kept = self.family.device.type == "cpu" and keep_heap()  # freed KV buffers reused, not re-faulted
        self.family.keep_states()  # the replica's weights never change: states may be reused across prune sets
        self.devset = devset
        self.settings = settings
        self.scorer = Scorer(spm=settings.spm, metrics=settings.metrics)
        self._limit_cache: dict[tuple[str, int], list[int]] = {}

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "units": self.family.units(), "size": asdict(self.family.size()),
                "family": self.family.name, "signatures": self.scorer.signatures(),
                "dispatch": getattr(self.family, "dispatch", None), "heap_kept": self.heap_kept,
                "exact_rows": self._exact_rows(),
                "lockstep": bool(self.family.lockstep and self._exact_rows()),
                "dtype": str(self.family.model.dtype).removeprefix("torch.")}

    def _exact_rows(self) -> bool:
        """Whether this replica's rows are exact for the configured decoding (the first two dev languages)."""
        langs = list(self.devset.lines)
        return bool(langs) and self.family.rows_exact(langs[0], langs[-1], self.settings.decoding)

    def evaluate(self, removed: list[str], directions: list[Direction], limit: int | None = None) -> dict:
        """Score a prune set on ``directions``, on the first ``limit`` sentences (all when None)."""
        t0 = time.perf_counter()
        per_direction: dict[str, dict[str, float]] = {}
        n = len(self.devset) if limit is None else min(limit, len(self.devset))
        with self.family.apply(removed):
            all_hyps = self._decode(directions, 0, n, n)
        for (src, tgt), hyps in zip(directions, all_hyps):
            per_direction[direction_name((src, tgt))] = self.scorer.score(hyps, list(self.devset.lines[tgt][:n]))
        metrics = {}
        for m in self.settings.metrics:
            scores = {d: s[m] for d, s in per_direction.items()}
            metrics[m] = {**scores, "mean": round(sum(scores.values()) / len(scores), 4)}
        size = self.family.size(removed)
        return {"score": metrics[self.settings.metric]["mean"], "metrics": metrics, "params": size.params,
                "bytes": size.bytes, "sentences": n * len(directions),
                "seconds": time.perf_counter() - t0, "actor": self.name}

    def _decode(self, directions: list[Direction], start: int, stop: int, horizon: int) -> list[list[str]]:
        """Hypotheses for dev sentences ``[start, stop)`` of each direction, decoded as the evaluation of the first
        ``horizon`` decodes them. Where rows are exact (:meth:`ModelFamily.rows_exact`) every direction's rows share
        token batches and each sentence keeps its token limit within the first ``horizon``
        (:meth:`ModelFamily.token_limits`), so a race chunk decodes as the full evaluation does; otherwise each
        direction runs length-sorted plain batches, within blocks of ``settings.block`` when set."""
        dec = self.settings.decoding
        jobs = [(list(self.devset.lines[src][start:stop]), src, tgt) for src, tgt in directions]
        if all(self.family.rows_exact(src, tgt, dec) for src, tgt in directions):
            limits = [self._limits(src, horizon)[start:stop] for src, _ in directions]
            return self.family.translate_many(jobs, dec, limits)
        b = self.settings.block or (stop - start) or 1
        return [[h for i in range(0, len(sources), b) for h in self.family.translate(sources[i : i + b], src, tgt, dec)]
                for sources, src, tgt in jobs]

    def _limits(self, src: str, horizon: int) -> list[int]:
        """The token limits of decoding the first ``horizon`` dev sentences from ``src`` (cached)."""
        if (src, horizon) not in self._limit_cache:
            lines = list(self.devset.lines[src][:horizon])
            self._limit_cache[src, horizon] = self.family.token_limits(
                lines, self.family._limit_lengths(lines, src, src), self.settings.decoding)
        return self._limit_cache[src, horizon]

    def sentence_stats(self, removed: list[str], directions: list[Direction], start: int, stop: int,
                       horizon: int | None = None) -> dict:
        """Hypotheses and per-sentence statistics of the primary metric for dev sentences ``[start, stop)``
        of each of ``directions`` (a racing chunk of a race over the first ``horizon``, see
        :mod:`cullmt_ray.racing`), one entry of ``parts`` per direction: decoded exactly as in :meth:`evaluate`
        of the first ``horizon`` when rows are exact (then every direction's rows share the batches), or when
        ``start`` and ``stop`` are on ``settings.block`` boundaries."""
        t0 = time.perf_counter()
        with self.family.apply(removed):
            all_hyps = self._decode(directions, start, stop, len(self.devset) if horizon is None else horizon)
        return {**self._stats_result(removed, directions, start, stop, all_hyps), "seconds": time.perf_counter() - t0}

    def sentence_stats_group(self, removed_sets: list[list[str]], directions: list[Direction], start: int, stop: int,
                             horizon: int | None = None) -> list[dict]:
        """:meth:`sentence_stats` of several prune sets on the same chunk, decoded together in lockstep
        (:meth:`ModelFamily.translate_group`; the pool sends these only where ``ready()['lockstep']``): one result
        per prune set, the same as its own task's, each with an equal share of the seconds."""
        t0 = time.perf_counter()
        horizon = len(self.devset) if horizon is None else horizon
        jobs = [(list(self.devset.lines[src][start:stop]), src, tgt) for src, tgt in directions]
        limits = [self._limits(src, horizon)[start:stop] for src, _ in directions]
        decoded = self.family.translate_group(removed_sets, jobs, self.settings.decoding, limits)
        out = [self._stats_result(removed, directions, start, stop, hyps) for removed, hyps in zip(removed_sets, decoded)]
        share = (time.perf_counter() - t0) / len(out)
        return [{**r, "seconds": share} for r in out]

    def _stats_result(self, removed: list[str], directions: list[Direction], start: int, stop: int,
                      all_hyps: list[list[str]]) -> dict:
        """A chunk's result (hypotheses and statistics per direction, size, sentences, actor), without its seconds."""
        parts = [{"hyps": hyps, "stats": self.scorer.sentence_stats(hyps, list(self.devset.lines[tgt][start:stop]),
                                                                    self.settings.metric)}
                 for (_, tgt), hyps in zip(directions, all_hyps)]
        size = self.family.size(removed)
        return {"directions": [tuple(d) for d in directions], "parts": parts, "params": size.params,
                "bytes": size.bytes, "sentences": sum(len(h) for h in all_hyps), "actor": self.name}

    def kl(self, removed: list[str], directions: list[Direction], limit: int | None = None,
           batch_size: int = 16) -> dict:
        """Teacher-forced KL(full || pruned) of a prune set, nats per target token (no decoding).

        The result has :meth:`evaluate`'s shape: ``metrics["kl"]`` per direction and mean, score
        ``-mean`` (the ranked score, :meth:`Metric.ranked`), ``sentences`` 0 generated (``teacher_forced`` says how many
        were scored). The full model's side (its top-k log-probs per target token, :func:`full_targets`)
        and the tokenized batches are computed once per direction and cached (bounded), so each candidate
        costs one pruned pass.
        """
        from .families.base import TensorCache
        from .proxies import full_targets, kl_cached

        t0 = time.perf_counter()
        n = len(self.devset) if limit is None else min(limit, len(self.devset))
        if not hasattr(self, "_kl_targets"):
            self._kl_batches: dict = {}
            self._kl_targets = TensorCache(KL_CACHE_MIB)
        per_direction = {}
        for src, tgt in directions:
            key = (src, tgt, n, batch_size)
            if key not in self._kl_batches:
                s, t = list(self.devset.lines[src][:n]), list(self.devset.lines[tgt][:n])
                self._kl_batches[key] = [self.family.teacher_forced(s[i : i + batch_size], t[i : i + batch_size], src, tgt)
                                         for i in range(0, n, batch_size)]
            batches = self._kl_batches[key]
            targets = [self._kl_targets.get((key, i), lambda b=b: full_targets(self.family, b)) for i, b in enumerate(batches)]
            per_direction[direction_name((src, tgt))] = kl_cached(self.family, batches, targets, removed)  # unrounded: tiny KLs still rank
        mean = sum(per_direction.values()) / len(per_direction)
        size = self.family.size(removed)
        return {"score": METRICS["kl"].ranked(mean), "metrics": {"kl": {**per_direction, "mean": mean}}, "params": size.params,
                "bytes": size.bytes, "sentences": 0, "teacher_forced": n * len(directions),
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

    def gate_stats(self, direction: Direction, sources: list[str], targets: list[str] | None = None,
                   batch_size: int = 16) -> dict:
        """MoE router statistics for one direction (see :meth:`NllbMoeFamily.gate_stats`): while the
        model translates ``sources``, or, with ``targets``, while it scores them by teacher forcing."""
        if not hasattr(self.family, "gate_stats"):
            raise ValueError(f"gate statistics need an NLLB-MoE model; {self.family.model_id} is {self.family.name}")
        src, tgt = direction
        if targets is None:
            runs = [lambda: self.family.translate(sources, src, tgt, self.settings.decoding)]
        else:
            runs = [lambda b=self.family.teacher_forced(sources[i : i + batch_size], targets[i : i + batch_size],
                                                        src, tgt): self.family.model(**b[0])
                    for i in range(0, len(sources), batch_size)]
        return self.family.gate_stats(runs, {"enc": src, "dec": tgt})

    def translate(self, removed: list[str], sources: list[str], src: str, tgt: str,
                  decoding: Decoding | None = None) -> list[str]:
        with self.family.apply(removed):
            return self.family.translate(sources, src, tgt, decoding or self.settings.decoding)

    def export(self, removed: list[str], out_dir: str, card: dict | None = None) -> str:
        """Save the model without ``removed`` (on this actor's node) so plain ``from_pretrained`` loads it."""
        return str(self.family.export(removed, out_dir, card))

    def pid(self) -> int:
        return os.getpid()

    def __repr__(self) -> str:  # the dashboard's Repr column and Ray's log prefix
        import socket

        return socket.gethostname()  # the node's host; the name says node id, run and slot


def merge_results(parts: list[dict], metric: str) -> dict:
    """One candidate's result from its per-direction results: means recomputed, costs summed."""
    metrics: dict[str, dict[str, float]] = {}
    for part in parts:
        for m, per in part["metrics"].items():
            metrics.setdefault(m, {}).update({d: v for d, v in per.items() if d != "mean"})
    for m, per in metrics.items():
        ordered = dict(sorted(per.items()))
        metrics[m] = {**ordered, "mean": METRICS[m].rounded(sum(ordered.values()) / len(ordered))}
    first = parts[0]
    return {"score": METRICS[metric].ranked(metrics[metric]["mean"]), "metrics": metrics, "params": first["params"],
            "bytes": first["bytes"], "sentences": sum(p["sentences"] for p in parts),
            "seconds": sum(p["seconds"] for p in parts),
            "actor": ",".join(sorted({p["actor"] for p in parts}))}


def plan_actors(res: ResourcesConfig) -> tuple[int, float, float, int]:
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


def place_actors(n: int, need: dict[str, float], placement: str = "spread") -> list[str | None]:
    """A node id for each of ``n`` actors that each need ``need`` (CPU, GPU, custom resources).

    Nodes are the alive ones whose total resources fit at least one actor, the driver's node first.
    ``spread`` deals actors round-robin over them, ``pack`` fills one before the next. ``None``
    where no node has room left: Ray queues that actor (and an autoscaler may add a node for it).
    """
    need = {k: float(v) for k, v in need.items() if v and v > 0}
    here = ray.get_runtime_context().get_node_id()
    nodes = sorted((nd for nd in ray.nodes() if nd.get("Alive")), key=lambda nd: (nd["NodeID"] != here, nd["NodeID"]))
    room = {nd["NodeID"]: int(min(nd["Resources"].get(k, 0.0) / v + 1e-9 for k, v in need.items()))
            for nd in nodes} if need else {}
    given = dict.fromkeys(room, 0)
    out: list[str | None] = []
    for _ in range(n):
        free = [nid for nid in room if room[nid] > 0]
        if not free:
            out.append(None)
            continue
        nid = min(free, key=given.__getitem__) if placement == "spread" else free[0]
        room[nid] -= 1
        given[nid] += 1
        out.append(nid)
    return out


# what each actor ran, remembered for placement (EvaluatorPool._spread): about what its caches of states hold
RAN_BATCHES, RAN_KEPT = 64, 32  # sentence ranges, and prune sets per range
# What a row costs besides its sentences' characters (its source and reference), in characters: the prompt's or
# language tokens' share of a row; cuts of a run of sentences over the actors balance these weights (_cut)
ROW_CHARS = 16


def _common(a: tuple, b: tuple) -> int:
    """The length of the common start of two tuples."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cut(start: int, stop: int, pieces: int, weights: list[float] | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into at most ``pieces`` runs of (nearly) equal weight (``weights[i]``: sentence
    ``i``'s; default: equal length): each cut where the running weight comes closest to its share."""
    n = max(1, min(pieces, stop - start))
    if weights is None:
        return [(start + (stop - start) * i // n, start + (stop - start) * (i + 1) // n) for i in range(n)]
    run = [0.0]
    for i in range(start, stop):
        run.append(run[-1] + weights[i])
    cuts = [start]
    for j in range(1, n):
        lo, hi = cuts[-1] + 1, stop - (n - j)  # every run keeps at least one sentence
        share = run[-1] * j / n
        cuts.append(min(range(lo, hi + 1), key=lambda c: (abs(run[c - start] - share), c)))
    return list(zip(cuts, cuts[1:] + [stop]))


def prefix_order(jobs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """``(candidate, ...)`` jobs with the candidates that remove later units first (their unit indices compared
    from the first removed unit on, larger first; other keys keep their place after them): a candidate run after
    another on an actor then shares the longest run of first layers with one before it, whose prompt states the
    actor keeps (:mod:`cullmt_ray.families.prefix`)."""
    def key(job) -> tuple:
        units = getattr(job[0], "units", None)
        if units is None:
            return ()
        parts = (tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in u.split(".")) for u in units)
        return tuple(sorted(parts))

    return sorted(jobs, key=key, reverse=True)


class EvaluatorPool:
    """A set of evaluator actors; spreads candidates over them and yields results as they finish."""

    def __init__(self, spec: ModelConfig, devset: DevSet, settings: EvalSettings,
                 resources: ResourcesConfig = ResourcesConfig(),
                 run: str = "run"):
        n, cpu, gpu, threads = plan_actors(resources)
        # Held for the pool's lifetime: a restarted actor re-reads its constructor arguments
        # from the object store (ray-project/ray#53727).
        self._devset_ref = ray.put(devset)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cls = ray.remote(EvaluatorActor)
        custom = dict(resources.actor_resources or {})
        nodes = place_actors(n, {"CPU": cpu, "GPU": gpu, **custom}, resources.placement)
        self.names = [f"evaluator-{node[:8] if node else 'any'}-{run}-{i}" for i, node in enumerate(nodes)]
        self.actors = []
        for name, node in zip(self.names, nodes):
            # soft: if that node is gone or busy, Ray places the actor elsewhere (the name then says where it was meant to run)
            where = NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True) if node else "DEFAULT"
            self.actors.append(cls.options(name=name, num_cpus=cpu, num_gpus=gpu, resources=custom or None,
                                           scheduling_strategy=where, max_restarts=3, max_task_retries=3,
                                           max_concurrency=1).remote(spec, self._devset_ref, settings, threads, name))
        self.info = ray.get([a.ready.remote() for a in self.actors])
        self.metric = settings.metric
        self._units = list(self.info[0]["units"]) if self.info else []
        self._ran: list[dict] = [{} for _ in self.actors]  # per actor: sentences -> units kept by its latest tasks on them
        self._held: dict[ray.ObjectRef, tuple[int, Any]] = {}  # filler calls running: ref -> (actor, key; None: dropped)
        self._filled: dict[Any, tuple[int, ray.ObjectRef]] = {}  # filler calls finished, not yet taken: key -> (actor, ref)
        self.lockstep = all(i.get("lockstep") for i in self.info)  # racing chunks of several prune sets in one task
        self.exact_rows = all(i.get("exact_rows") for i in self.info)  # a sentence decodes the same in any batch
        self._devset = devset
        self._weights: dict[tuple, list[float]] = {}

    @property
    def size(self) -> int:
        return len(self.actors)

    def evaluate(self, jobs: Iterable[tuple[Candidate, list[Direction]]], limit: int | None = None,
                 metric: str | None = None) -> Iterator[tuple[Candidate, dict]]:
        """Yield ``(candidate, result)`` as candidates complete, scored by ``metric`` (default the primary
        one); a metric that needs no decoding (the KL proxy) runs :meth:`EvaluatorActor.kl` instead.

        A task is a whole candidate (all its directions decoded together: fuller batches, see
        :meth:`ModelFamily.translate_many`), except for the candidates left over when they do not
        divide evenly over the actors (all of them when there are fewer candidates than actors: the
        baseline, a final held-out check): those are split into one task per direction, so that every
        actor stays busy to the end. An actor runs one task at a time. A candidate's result is its
        tasks' results merged.
        """
        metric = metric or self.metric
        method = "evaluate" if METRICS[metric].decoded else metric
        tasks = self.split(list(jobs))
        parts_left: dict[Candidate, int] = {}
        for c, _ in tasks:
            parts_left[c] = parts_left.get(c, 0) + 1
        parts: dict[Candidate, list[dict]] = {}
        calls = ((c, lambda a, c=c, d=d: getattr(a, method).remote(c.units, d, limit), self._place(c.units, d, 0, limit))
                 for c, d in tasks)
        for cand, part in self._spread(calls):
            parts.setdefault(cand, []).append(part)
            parts_left[cand] -= 1
            if parts_left[cand] == 0:
                yield cand, merge_results(parts.pop(cand), metric)

    def _place(self, removed: Iterable[str], directions, start: int, stop: int | None) -> tuple:
        """A task's placement key: the sentences it decodes, and the units it keeps in model order. An actor keeps
        states of what it decoded (the encoder's output per encoder set, a decoder-only model's prompt states per
        run of first layers: :meth:`ModelFamily.keep_states`), so a task is worth most on the actor that ran a task
        of the same sentences keeping the longest same run of first units."""
        gone = set(removed)
        return (tuple(map(tuple, directions)), start, stop), tuple(u for u in self._units if u not in gone)

    def _shared(self, j: int, place: tuple) -> int:
        """How many first units a task (:meth:`_place`) shares with the tasks of its sentences actor ``j`` ran."""
        batch, kept = place
        return max((_common(kept, k) for k in self._ran[j].get(batch, ())), default=0)

    def _ran_on(self, j: int, place: tuple) -> None:
        batch, kept = place
        runs = self._ran[j].pop(batch, [])  # re-inserted: the batches least recently run are forgotten first
        self._ran[j][batch] = (runs + [kept])[-RAN_KEPT:]
        while len(self._ran[j]) > RAN_BATCHES:
            self._ran[j].pop(next(iter(self._ran[j])))

    def _spread(self, calls: Iterable[tuple], fillers: Iterable[tuple] = ()) -> Iterator[tuple[Any, Any]]:
        """Run ``(key, actor -> ObjectRef[, placement key])`` calls, one at a time per actor; yield ``(key, result)``
        as they finish (every actor stays busy while calls are left). A free actor takes the first call that shares
        the most more first units with what it ran on the same sentences than with what any other actor ran
        (:meth:`_place`): a greedy step's candidates then reuse the states their base set left on an actor. Calls
        without a placement key run in order.

        ``fillers`` (calls of the same shape, in order) run only on an actor that has no call left to take while
        others still run, and are not waited for: the generator ends when ``calls`` are done, and a filler's result
        is taken later (:meth:`filled`). An actor running one is busy for every call until it finishes."""
        pending = [c if len(c) > 2 else (*c, None) for c in calls]
        fill = [c if len(c) > 2 else (*c, None) for c in fillers]
        n = len(self.actors)
        shared = [[self._shared(j, c[2]) if c[2] is not None else 0 for j in range(n)] for c in pending]
        running: dict[ray.ObjectRef, tuple[int, Any]] = {}
        busy = {i for i, _ in self._held.values()}
        free = [j for j in range(n) if j not in busy]
        while True:
            while free and pending:
                i = free.pop(0)
                best = max(range(len(pending)), key=lambda k: (shared[k][i] - max((v for j, v in enumerate(shared[k]) if j != i),
                                                                                  default=0), -k))
                nxt = pending.pop(best)
                shared.pop(best)
                if nxt[2] is not None:
                    self._ran_on(i, nxt[2])
                    for k, c in enumerate(pending):  # what actor i now holds
                        if c[2] is not None and c[2][0] == nxt[2][0]:
                            shared[k][i] = max(shared[k][i], _common(c[2][1], nxt[2][1]))
                running[nxt[1](self.actors[i])] = (i, nxt[0])
            while free and fill and running:  # nothing left to take, others still running: a filler
                i = free.pop(0)
                key, call, place = fill.pop(0)
                if place is not None:
                    self._ran_on(i, place)
                self._held[call(self.actors[i])] = (i, key)
            if not running and not pending:  # (calls still pending, none running: every actor runs a filler)
                return
            done, _ = ray.wait([*running, *self._held], num_returns=1)
            if done[0] in self._held:
                i, key = self._held.pop(done[0])
                free.append(i)
                if key is not None:
                    self._filled[key] = (i, done[0])
                continue
            i, key = running.pop(done[0])
            free.append(i)
            yield key, self._get(done[0], i)

    def _get(self, ref: ray.ObjectRef, i: int) -> Any:
        """The result of actor ``i``'s call ``ref``; a clear error where the actor died for good."""
        try:
            return ray.get(ref)
        except RayActorError as e:
            raise RunError(f"evaluator actor {self.names[i]} died and Ray could not restart it "
                           f"({type(e).__name__}); every finished evaluation is stored") from e

    def holds(self, key) -> bool:
        """Whether a filler call of ``key`` was started (running or finished, not yet taken or dropped)."""
        return key in self._filled or any(k == key for _, k in self._held.values())

    def filled(self, key) -> Any:
        """The result of the filler call of ``key`` (:meth:`_spread`), waiting for it if it still runs."""
        i, ref = self._filled.pop(key, (None, None))
        if ref is None:
            ref = next(r for r, (_, k) in self._held.items() if k == key)
            i, _ = self._held.pop(ref)  # its actor is free once the result is in
        return self._get(ref, i)

    def drop(self, key) -> None:
        """Forget the filler call of ``key``: its result is not wanted (it still occupies its actor until it ends)."""
        self._filled.pop(key, None)
        for ref, (i, k) in list(self._held.items()):
            if k == key:
                self._held[ref] = (i, None)

    def sentence_stats(self, jobs: Iterable[tuple], horizon: int | None = None,
                       fillers: Iterable[tuple] = ()) -> Iterator[tuple[Any, dict]]:
        """Spread ``(key, removed, directions, start, stop)`` racing chunks of a race over the first ``horizon``
        sentences over the actors; yield ``(key, per-sentence statistics per direction)`` as they finish
        (:meth:`EvaluatorActor.sentence_stats`; ``start`` added: where the piece starts). Where the actors decode
        prune sets in lockstep (``lockstep``), the chunks of the same sentences are one task (:meth:`_groups`),
        decoding its prune sets together (:meth:`EvaluatorActor.sentence_stats_group`). ``fillers``: chunks of the
        same shape run only by an actor the others leave idle (:meth:`_spread`), each one task; the result of filler
        ``(key, ..., start, stop)`` is taken with :meth:`filled` ``((key, start))``."""
        calls = []
        for group in self._groups(list(jobs)):
            (key, removed, d, s, e), rest = group[0], group[1:]
            if not rest:
                calls.append(((key, s), lambda a, r=removed, d=d, s=s, e=e: a.sentence_stats.remote(list(r), list(d), s, e, horizon),
                              self._place(removed, d, s, e)))
            else:
                sets = [list(j[1]) for j in group]
                calls.append(((tuple(j[0] for j in group), s),
                              lambda a, sets=sets, d=d, s=s, e=e: a.sentence_stats_group.remote(sets, list(d), s, e, horizon),
                              self._place(removed, d, s, e)))
        fill = [((key, s), lambda a, r=removed, d=d, s=s, e=e: a.sentence_stats.remote(list(r), list(d), s, e, horizon),
                 self._place(removed, d, s, e)) for key, removed, d, s, e in fillers]
        for (keys, s), result in self._spread(calls, fill):
            if isinstance(result, list):
                yield from ((k, {**r, "start": s}) for k, r in zip(keys, result))
            else:
                yield keys, {**result, "start": s}

    def weights(self, directions) -> list[float]:
        """Per dev sentence, what decoding it in ``directions`` costs, roughly: its source's and reference's characters
        in each direction plus :data:`ROW_CHARS` per row (the generated length follows the reference's, the prompt the
        source's), so that the pieces :func:`_cut` gives the actors take about as long as each other."""
        key = tuple(map(tuple, directions))
        if key not in self._weights:
            lines = self._devset.lines
            self._weights[key] = [sum(len(lines[src][i]) + len(lines[tgt][i]) + ROW_CHARS for src, tgt in key)
                                  for i in range(len(self._devset))]
        return self._weights[key]

    def race_tasks(self, chunks: list[tuple]) -> list[tuple]:
        """Racing chunks ``(key, removed, directions, start, stop)`` cut into pieces of the same shape (a key's pieces
        make its chunk) that share a round out evenly over the actors (by :meth:`weights`), so that none waits for the
        others at its end.
        Where rows are exact (a sentence decodes the same in any batch): in lockstep, each run of sentences is cut
        into one piece per actor, each with every prune set (one task per actor, :meth:`_groups`); otherwise each
        chunk is a task, except the chunks left over when they do not divide evenly over the actors, cut by
        sentences into one piece per actor (all directions together: fuller batches than one direction each).
        Where rows are not exact (decoded in blocks), the leftovers are cut by direction instead, never a block.
        Chunks of candidates that remove later units go first (:func:`prefix_order`)."""
        chunks = prefix_order(chunks)
        k = self.size
        if self.lockstep:  # lockstep only where rows are exact (EvaluatorActor.ready)
            return [(key, r, d, a, b) for key, r, d, s, e in chunks for a, b in _cut(s, e, k, self.weights(d))]
        whole = len(chunks) - len(chunks) % k
        if self.exact_rows:
            return chunks[:whole] + [(key, r, d, a, b) for key, r, d, s, e in chunks[whole:]
                                     for a, b in _cut(s, e, k, self.weights(d))]
        return chunks[:whole] + [(key, r, [one], s, e) for key, r, d, s, e in chunks[whole:] for one in d]

    def _groups(self, jobs: list[tuple]) -> list[list[tuple]]:
        """Racing chunks as tasks: one each, or, where the actors decode in lockstep, the chunks of the same
        sentences (directions, start, stop) in one task (:meth:`race_tasks` cuts a round's sentences for the actors)."""
        if not self.lockstep:
            return [[j] for j in jobs]
        same: dict[tuple, list[tuple]] = {}
        for j in jobs:
            same.setdefault((tuple(map(tuple, j[2])), j[3], j[4]), []).append(j)
        return list(same.values())

    def split(self, jobs: list[tuple[Any, list[Direction]]]) -> list[tuple[Any, list[Direction]]]:
        """``(key, directions)`` tasks from ``(key, directions)`` jobs: one task per job with every direction
        (decoded together: fuller batches), except the jobs left over when they do not divide evenly over the
        actors, which get one task per direction so that every actor stays busy to the end. Candidates that
        remove later units go first (:func:`prefix_order`)."""
        jobs = prefix_order(jobs)
        whole = len(jobs) - len(jobs) % self.size
        return [(k, list(dirs)) for k, dirs in jobs[:whole]] + [(k, [d]) for k, dirs in jobs[whole:] for d in dirs]

    def proxies(self, units: list[str], directions: list[Direction]) -> dict:
        """Importance proxies for ``units`` (see :mod:`cullmt_ray.proxies`), units spread over the actors."""
        shares = [units[i :: self.size] for i in range(self.size)]
        parts = ray.get([a.proxies.remote(share, directions) for a, share in zip(self.actors, shares) if share])
        return {"kl": {u: p["kl"][u] for p in parts for u in p["kl"]},
                "angle": {u: p["angle"][u] for p in parts for u in p["angle"]},
                "seconds": sum(p["seconds"] for p in parts), "sentences": parts[0]["sentences"]}

    def gate_stats(self, lines: dict[str, list[str]], directions: list[Direction],
                   teacher_forced: bool = False) -> dict[str, dict]:
        """Router statistics per direction (``{"eng_Latn-deu_Latn": stats}``), directions spread over the actors."""
        refs = [self.actors[i % self.size].gate_stats.remote(d, lines[d[0]], lines[d[1]] if teacher_forced else None)
                for i, d in enumerate(directions)]
        return {direction_name(d): st for d, st in zip(directions, ray.get(refs))}

    def translate(self, removed: list[str], sources: list[str], src: str, tgt: str) -> list[str]:
        """Translate with the first actor (used for reports and, later, KD data)."""
        return ray.get(self.actors[0].translate.remote(removed, sources, src, tgt))

    def translate_many(self, jobs: Iterable[tuple[Any, list[str], list[str], str, str]],
                       decoding: Decoding | None = None) -> Iterator[tuple[Any, list[str]]]:
        """Spread ``(key, removed, sources, src, tgt)`` translation jobs over the actors (one at a time
        each); yield ``(key, hypotheses)`` as jobs finish. Used for KD data (:mod:`cullmt_ray.heal.kd`)."""
        return self._spread((key, lambda a, r=removed, s=sources, src=src, tgt=tgt:
                             a.translate.remote(list(r), list(s), src, tgt, decoding))
                            for key, removed, sources, src, tgt in jobs)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
