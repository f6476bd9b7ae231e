"""Evaluation speed (issue 15): racing greedy vs plain greedy, one candidate vs naive, the demo search,
and a scale part on random-initialised models of real shapes. Ratios are measured within one run.

Parts (``--parts``, comma-separated; each merges its section into results/bench/speed.json):
- ``greedy``: greedy searches on reference:dense and reference:llama with the demo settings (100 sentences x 6
  English-centric directions, threshold 2.0, 2 actors), fresh stores, in three variants: ``plain`` (HF generate,
  ``CULLMT_GREEDY_LOOP=0``, no racing: evaluation as before issue 15), ``loop`` (the greedy loop, no racing) and
  ``fast`` (the defaults: the loop and racing, front completed): wall ratios to plain, sentences decoded, same
  final set, score, steps and Pareto front; ``--rounds`` rounds in rotating order, ratios of the medians; and a
  floor per model: what the fast search could take at best with its decoding as it is (:func:`_floor`).
- ``candidate``: one candidate (enc.1 + dec.4 removed, 48 sentences, 1 thread): cullmt-ray's route (the greedy
  loop, :mod:`cullmt_ray.families.greedy`) vs a naive ``deepcopy`` + delete + unsorted HF ``generate``, plus a
  decoder-only candidate with the encoder cache; and the route with the loop vs with HF ``generate``.
- ``states``: what the states at layer boundaries buy (``cullmt_ray/families/prefix.py``): greedy's first step
  on two replicas in the pool's order, with and without them (interleaved, same outputs).
- ``stems``: a decoder-only prompt pass with its stems in runs of similar length, each padded to its own longest
  (``greedy._stem_runs``), vs one run padded to the longest stem: greedy's first step as racing's first round
  (each candidate on ``--chunk`` sentences x 6 directions) and as full evaluations, on two replicas with their kept
  states as actors hold them (interleaved, same outputs).
- ``lockstep``: a decoder-only race round decoded in lockstep (every candidate's rows in one batch, each layer
  computing the rows of the candidates that keep it) vs one candidate after another (interleaved, same outputs).
- ``head``: greedy's next tokens from the output head's product in bfloat16, certified by a rounding bound
  (``cullmt_ray/families/head.py``), vs the float32 head: a lockstep race round's head rows on each reference model,
  the head alone and the whole round (same tokens).
- ``heap``: a lockstep race round with the replica keeping freed large blocks on glibc's heap
  (``cullmt_ray/heap.py``, the actors' default) vs glibc's default (``CULLMT_KEEP_HEAP=0``): time, page faults,
  peak RSS, same outputs.
- ``demo``: README command 1 (``cullmt-ray search``, the embedded default): wall time, answer.
- ``bf16``: the greedy loop in bf16 vs fp32 on this CPU (a demo candidate), and whether bf16 rows stay exact.
- ``scale``: NLLB-200-distilled-600M-shaped and Llama-3.2-1B-shaped random models (configs written here,
  no download): apply/restore time, RSS over 100 apply/restore cycles, teacher-forced KL pass vs greedy
  decoding per sentence (fixed 32-token outputs), per-layer costs, fp32 vs bf16 decoding, and a
  GPU-hours projection for CULL-MT's NLLB-3.3B greedy (48 layers, 12 removed), plain vs racing.
    python bench/bench_speed.py [--parts greedy,candidate,states,stems,lockstep,head,heap,demo,bf16,scale]
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, cpu_model, parser, save

OUT = RESULTS / "speed.json"


def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def _search(model: str, tmp: Path, name: str, extra: list[str], sentences: int, env_extra: dict | None = None,
            store: Path | None = None) -> dict:
    """One ``cullmt-ray search`` in a subprocess (its own Ray cluster), fresh store (or ``store``); its facts."""
    out = tmp / name
    cmd = [sys.executable, "-m", "cullmt_ray.cli", "-q", "search", "--set", f"model.name={model}",
           "--set", f"data.max_sentences={sentences}", "--set", f"output.dir={out}",
           "--set", f"output.store={store or out / 'store.sqlite'}", "--set", f"name={name}",
           *sum((["--set", e] for e in extra), [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CULLMT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    load = os.getloadavg()[0]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    run_dir = next(out.glob(f"{name}-*"))
    info = json.loads((run_dir / "run.json").read_text())
    trace = json.loads((run_dir / "trace.json").read_text())
    accepted = [s for s in trace["steps"] if s["accepted"]]
    last = accepted[-1] if accepted else trace["steps"][-1]
    races = info.get("racing", [])
    front = [line.split(",")[2] + f" {float(line.split(',')[6]):.4f}"
             for line in (run_dir / "pareto.csv").read_text().splitlines()[1:]]  # removed_units, score
    return {"final": trace["final"], "pareto_front": front,
            "front_completed": info.get("racing_front_completed", []), "score": last["best_score"], "stop_reason": trace["stop_reason"],
            "steps": [(s["best_unit"], s["best_score"], s["accepted"]) for s in trace["steps"]],
            "evaluations": info["budget"]["evaluations"], "sentences_decoded": info["budget"]["sentences"],
            "wall_seconds": round(wall, 1), "search_seconds": info["wall_seconds"],
            "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            "race_steps": [{k: r[k] for k in ("candidates", "rounds", "survivors", "decoded_sentences", "plain_sentences")}
                           for r in races]}


# the greedy part's variants: (environment, --set overrides)
VARIANTS = {"plain": ({"CULLMT_GREEDY_LOOP": "0"}, ["search.racing=false"]),  # HF generate, no racing: before issue 15
            "loop": ({}, ["search.racing=false"]),  # greedy loop, directions share batches, no racing
            "fast": ({}, [])}  # the defaults: the loop, and racing (auto) with the front completed


def part_greedy(args) -> dict:
    """``--rounds`` rounds of the three variants per model, in a rotating order (plain loop fast, loop fast plain,
    ...) with a pause between searches, so that none always runs first on a quiet machine; the ratios are of the
    median wall times (each round's runs are kept too)."""
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="cullmt-speed-"))
    names = list(VARIANTS)
    try:
        for model in args.models.split(","):
            tag = model.split(":")[-1]
            rounds: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    env, sets = VARIANTS[name]
                    sets = [*sets, f"search.racing_chunk={args.chunk}"] if name == "fast" else sets
                    time.sleep(args.pause)  # the last search's cluster gone, the load settled
                    rounds[name].append(_search(model, tmp, f"{name}-{tag}-{r}", sets, args.sentences, env))
            runs = {name: rounds[name][0] | {"wall_seconds": statistics.median(x["wall_seconds"] for x in rounds[name]),
                                             "search_seconds": statistics.median(x["search_seconds"] for x in rounds[name]),
                                             "wall_seconds_each": [x["wall_seconds"] for x in rounds[name]],
                                             "loadavg_1min": [x["loadavg_1min"] for x in rounds[name]]}
                    for name in names}
            plain = runs["plain"]
            res = dict(runs)
            for name in ("loop", "fast"):
                r = runs[name]
                same = [all(x[k] == plain[k] for x in rounds[name]) for k in ("final", "steps", "pareto_front")]
                res[f"{name}_over_plain"] = {
                    "wall_ratio": round(r["wall_seconds"] / plain["wall_seconds"], 3),
                    "wall_ratio_each_round": [round(x["wall_seconds"] / p["wall_seconds"], 3)
                                              for x, p in zip(rounds[name], rounds["plain"])],
                    "search_ratio": round(r["search_seconds"] / plain["search_seconds"], 3),
                    "decoded_ratio": round(r["sentences_decoded"] / plain["sentences_decoded"], 3),
                    "same_final": same[0],
                    "same_score": all(abs(x["score"] - plain["score"]) < 1e-9 for x in rounds[name]),
                    "same_steps": same[1],
                    "same_pareto_front": same[2],
                    "same_decision_every_step": all([a[0] for a in x["steps"]] == [b[0] for b in plain["steps"]]
                                                    for x in rounds[name])}
            res["floor"] = _floor(model, tmp, tag, args.rounds - 1, args, plain["wall_seconds"])
            out[tag] = res
            print(tag, {k: v for k, v in res.items() if k not in VARIANTS}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"greedy": {"sentences": args.sentences, "racing_chunk": args.chunk, "confidence": 0.99, "rounds": args.rounds,
                       "variants": {k: {"env": e, "set": v} for k, (e, v) in VARIANTS.items()},
                       "settings": "demo: 6 English-centric directions, threshold 2.0, 2 actors x 1 CPU", **out}}


def _floor(model: str, tmp: Path, tag: str, r: int, args, plain_wall: float) -> dict:
    """What the fast search could take at best with its decoding as it is: the fixed cost of a search (plain rerun on
    its own store: every evaluation read, none decoded: start-up, strategy, files, exit) plus the actor time of the
    fast run's full evaluations (baseline, step winners, ties, front points) and of each raced-out candidate's first
    chunk only (every loser out after one round), spread over the actors with none idle."""
    import sqlite3

    env, sets = VARIANTS["plain"]
    fixed = _search(model, tmp, f"cached-{tag}", sets, args.sentences, env, store=tmp / f"plain-{tag}-{r}" / "store.sqlite")
    assert fixed["sentences_decoded"] == 0, fixed["sentences_decoded"]
    con = sqlite3.connect(tmp / f"fast-{tag}-{r}" / "store.sqlite")
    raced = {c for (c,) in con.execute("SELECT context FROM contexts WHERE description LIKE '%\"raced\"%'")}
    full_s, first_s = 0.0, 0.0
    for ctx, seconds, sentences, n_dirs in con.execute(
            "SELECT context, seconds, sentences, (SELECT count(*) FROM json_each(metrics, '$.spbleu')) - 2 "
            "FROM evaluations"):  # a raced-out spbleu entry holds its directions, the mean and the upper bound
        if ctx in raced:
            first_s += seconds * min(1.0, args.chunk * n_dirs / sentences)
        else:
            full_s += seconds
    con.close()
    actors = 2
    floor = fixed["wall_seconds"] + (full_s + first_s) / actors
    return {"fixed_seconds": fixed["wall_seconds"], "full_evaluations_actor_seconds": round(full_s, 2),
            "raced_out_first_chunks_actor_seconds": round(first_s, 2), "actors": actors,
            "floor_seconds": round(floor, 1), "floor_over_plain": round(floor / plain_wall, 3)}


def part_candidate(args) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from bench_eval import forget_own_states, versus_naive

    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.data import load_devset
    from cullmt_ray.families import load_family

    torch.set_num_threads(1)
    fam = load_family(ModelConfig("reference:dense"))
    fam.keep_states()  # as an evaluator actor does
    sources = list(load_devset("builtin:demo").subsample(48).lines["eng_Latn"])
    dec = Decoding(batch_size=16)
    res = {}
    for removed in (["enc.1", "dec.4"], ["dec.4"]):
        fam.encoder_cache.clear()
        ours, theirs, same = versus_naive(fam, removed, sources, dec, args.repeats)
        loop, gen = [], []  # what the greedy loop buys over HF generate within cullmt-ray's route (interleaved)
        for _ in range(args.repeats):
            for fast, acc in ((True, loop), (False, gen)):
                fam.fast_greedy = fast
                forget_own_states(fam)
                t = time.perf_counter()
                with fam.apply(removed):
                    out = fam.translate(sources, "eng_Latn", "deu_Latn", dec)
                acc.append(time.perf_counter() - t)
                if fast:
                    a = out
            fam.fast_greedy = True
        res["+".join(removed)] = {"cullmt_seconds_median": round(statistics.median(ours), 3),
                                  "naive_seconds_median": round(statistics.median(theirs), 3),
                                  "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
                                  "identical_outputs": f"{same}/{len(sources)}",
                                  "greedy_loop_over_generate": round(statistics.median(loop) / statistics.median(gen), 3),
                                  "loop_equals_generate": a == out,
                                  "note": "encoder output cached (decoder-only prune set; first repeat fills it)"
                                  if not any(u.startswith("enc.") for u in removed) else "no cache applies"}
    print(res, flush=True)
    return {"candidate": {"model": "reference:dense", "sentences": len(sources), "threads": 1, **res,
                          "all_directions": _all_directions(fam, Decoding(), args.repeats)}}


def _all_directions(fam, dec, repeats: int) -> dict:
    """A demo candidate (100 sentences x 6 directions): every direction's rows in shared batches
    (``translate_many``, what an actor task runs) vs one direction at a time, interleaved; and the share of
    the time the encoder takes (what caching hidden states at encoder layer boundaries could save at most)."""
    from bench_eval import forget_own_states

    from cullmt_ray.data import load_devset, parse_directions

    dev = load_devset("builtin:demo")
    jobs = [(list(dev.lines[s][:100]), s, t) for s, t in parse_directions("english-centric", list(dev.lines))]
    enc_seconds = [0.0]

    def pre(*_):
        enc_seconds.append(time.perf_counter())

    def post(*_):
        enc_seconds[0] += time.perf_counter() - enc_seconds.pop()

    out = {}
    for removed in (["enc.1"], ["dec.4"]):
        fam.encoder_cache.clear()
        many, alone, enc_share = [], [], []
        with fam.apply(removed):
            fam.translate_many(jobs, dec)  # warm (fills the encoder cache for a decoder-only set)
            for _ in range(repeats):
                forget_own_states(fam)
                t = time.perf_counter()
                a = [fam.translate(*job, dec) for job in jobs]
                alone.append(time.perf_counter() - t)
                hooks = [fam.model.model.encoder.register_forward_pre_hook(pre),
                         fam.model.model.encoder.register_forward_hook(post)]
                enc_seconds[0] = 0.0
                forget_own_states(fam)
                t = time.perf_counter()
                b = fam.translate_many(jobs, dec)
                many.append(time.perf_counter() - t)
                enc_share.append(enc_seconds[0] / many[-1])
                for h in hooks:
                    h.remove()
        out["+".join(removed)] = {"shared_batches_seconds_median": round(statistics.median(many), 3),
                                  "per_direction_seconds_median": round(statistics.median(alone), 3),
                                  "ratio": round(statistics.median(many) / statistics.median(alone), 3),
                                  "identical_outputs": f"{sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))}"
                                                       f"/{sum(len(j[0]) for j in jobs)}",
                                  "encoder_share_of_time": round(statistics.median(enc_share), 3)}
    print("all directions", out, flush=True)
    return out


def part_states(args) -> dict:
    """What the states at layer boundaries buy (``cullmt_ray/families/prefix.py``): greedy's first step (every
    single-unit candidate, the demo's sentences x 6 directions) dealt in the pool's order to two replicas in turn
    (as two actors take them), decoded with and without the kept states, interleaved; 1 thread; same outputs."""
    import torch

    from cullmt_ray.candidate import Candidate
    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.evaluator import prefix_order
    from cullmt_ray.families import load_family
    from cullmt_ray.families.prefix import PrefixStates

    torch.set_num_threads(1)
    dev = load_devset("builtin:demo")
    jobs = [(list(dev.lines[s][: args.sentences]), s, t)
            for s, t in parse_directions("english-centric", list(dev.lines))]
    out = {}
    for model in args.models.split(","):
        replicas = [load_family(ModelConfig(model)) for _ in range(2)]
        if not hasattr(replicas[0], "prefix_states"):
            continue  # families without them (encoder-decoder: see the note below)
        for fam in replicas:
            fam.keep_states()  # as an evaluator actor does (the encoder output cache too, in both variants)
        order = [c.units for c, _ in prefix_order([(Candidate.of([u]), None) for u in replicas[0].units()])]
        seconds: dict[str, list[float]] = {"without": [], "with": []}
        hyps: dict[str, list] = {}
        for _ in range(min(args.repeats, 2)):
            for name in ("without", "with"):
                for fam in replicas:
                    fam.prefix_states = PrefixStates(fam.prefix_states_mib) if name == "with" else None
                t, got = time.perf_counter(), []
                for i, units in enumerate(order):
                    fam = replicas[i % 2]
                    with fam.apply(units):
                        got.append(fam.translate_many(jobs, Decoding()))
                seconds[name].append(time.perf_counter() - t)
                hyps[name] = got
        res = {"candidates": len(order), "sentences": len(order) * sum(len(j[0]) for j in jobs),
               "without_seconds": round(min(seconds["without"]), 2), "with_seconds": round(min(seconds["with"]), 2),
               "ratio": round(min(seconds["with"]) / min(seconds["without"]), 3),
               "identical_outputs": hyps["with"] == hyps["without"]}
        out[model.split(":")[-1]] = res
        print("states", model, res, flush=True)
    return {"states": {"settings": "greedy's first step dealt to 2 replicas in pool order, 1 thread, best of 2",
                       **out, "encoder_decoder_note": (
                           "the encoder's states replayed the same way (commit 45a058b) measured 44.54 s vs "
                           "45.08 s (0.988x) on reference:dense's first step, same outputs: not kept")}}


def part_stems(args) -> dict:
    """Stems in runs of similar length vs one run padded to the longest (``greedy.STEM_RUN_TOKENS`` huge): greedy's
    first step on reference:llama dealt in the pool's order to two replicas keeping their states, per candidate its
    first racing chunk (``--chunk`` sentences) or all ``--sentences``; interleaved, best of ``--repeats``; 1 thread."""
    import torch

    from cullmt_ray.candidate import Candidate
    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.evaluator import prefix_order
    from cullmt_ray.families import greedy, load_family

    torch.set_num_threads(1)
    dev = load_devset("builtin:demo")
    dirs = parse_directions("english-centric", list(dev.lines))
    replicas = [load_family(ModelConfig("reference:llama")) for _ in range(2)]
    order = [c.units for c, _ in prefix_order([(Candidate.of([u]), None) for u in replicas[0].units()])]
    default, out = greedy.STEM_RUN_TOKENS, {}
    try:
        for work, n in (("first_chunk", args.chunk), ("full", args.sentences)):
            jobs = [(list(dev.lines[s][:n]), s, t) for s, t in dirs]
            seconds: dict[str, list[float]] = {"one_run": [], "runs": []}
            hyps: dict[str, list] = {}
            for r in range(args.repeats):
                for name in ("one_run", "runs") if r % 2 else ("runs", "one_run"):
                    greedy.STEM_RUN_TOKENS = default if name == "runs" else 10**9
                    for fam in replicas:
                        fam.keep_states()  # fresh kept states each time, as a new step's actors start with none
                    t, got = time.perf_counter(), []
                    for i, units in enumerate(order):
                        with replicas[i % 2].apply(units):
                            got.append(replicas[i % 2].translate_many(jobs, Decoding()))
                    seconds[name].append(time.perf_counter() - t)
                    hyps[name] = got
            out[work] = {"sentences": n * len(dirs), "candidates": len(order),
                         "one_run_seconds": round(min(seconds["one_run"]), 3),
                         "runs_seconds": round(min(seconds["runs"]), 3),
                         "ratio": round(min(seconds["runs"]) / min(seconds["one_run"]), 3),
                         "identical_outputs": hyps["runs"] == hyps["one_run"]}
            print("stems", work, out[work], flush=True)
    finally:
        greedy.STEM_RUN_TOKENS = default
    return {"stems": {"model": "reference:llama", "run_tokens": default, "threads": 1, "repeats": args.repeats, **out}}


def part_lockstep(args) -> dict:
    """A decoder-only race round in lockstep (``greedy.greedy_causal_group``) vs its prune sets one after another:
    reference:llama's greedy step 2 after the search's first answer (layer.2 removed; the five candidates adding one
    more layer), each on its first racing chunk (``--chunk`` sentences x 6 directions) and on twice that, on a
    replica holding its base set's prompt states (as the actor that ran the base set); interleaved, median of
    ``--repeats``; 1 thread."""
    import torch

    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.families import load_family

    torch.set_num_threads(1)
    dev = load_devset("builtin:demo")
    dirs = parse_directions("english-centric", list(dev.lines))
    fam = load_family(ModelConfig("reference:llama"))
    fam.keep_states()
    base = ["layer.2"]
    sets = [base + [u] for u in fam.units() if u not in base]
    out = {}
    for n in (args.chunk, 2 * args.chunk):
        jobs = [(list(dev.lines[s][:n]), s, t) for s, t in dirs]
        with fam.apply(base):
            fam.translate_many(jobs, Decoding())  # the base set's kept prompt states
        seconds: dict[bool, list[float]] = {True: [], False: []}
        hyps: dict[bool, list] = {}
        for r in range(args.repeats):
            for lock in (True, False) if r % 2 == 0 else (False, True):
                fam.lockstep = lock
                t = time.perf_counter()
                hyps[lock] = fam.translate_group(sets, jobs, Decoding())
                seconds[lock].append(time.perf_counter() - t)
        fam.lockstep = True
        lock_s, alone_s = statistics.median(seconds[True]), statistics.median(seconds[False])
        out[f"{n}_sentences"] = {"rows": n * len(dirs) * len(sets), "lockstep_seconds": round(lock_s, 3),
                                 "one_after_another_seconds": round(alone_s, 3), "ratio": round(lock_s / alone_s, 3),
                                 "identical_outputs": hyps[True] == hyps[False]}
        print("lockstep", n, out[f"{n}_sentences"], flush=True)
    return {"lockstep": {"model": "reference:llama", "base": base, "candidates": len(sets), "threads": 1,
                         "repeats": args.repeats, **out}}


def part_head(args) -> dict:
    """The output head's argmax certified from its bfloat16 product (``cullmt_ray/families/head.py``) vs the float32
    head: on each reference model, the rows its head sees in greedy's second step decoded in lockstep (its race's
    first round: the search's first answer removed, every candidate adding one more unit, ``--chunk`` sentences x 6
    directions), captured, then both ways on the same rows, interleaved, median of ``--repeats``; and the whole round
    with the certified head on and off (``CULLMT_BF16_HEAD``, same outputs); 1 thread."""
    import torch

    import cullmt_ray.families.greedy as greedy
    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.families import load_family
    from cullmt_ray.families.head import head_argmax, native_bf16

    torch.set_num_threads(1)
    dev = load_devset("builtin:demo")
    dirs = parse_directions("english-centric", list(dev.lines))
    jobs = [(list(dev.lines[s][: args.chunk]), s, t) for s, t in dirs]
    out = {"native_bf16": native_bf16(torch.device("cpu")), "threads": 1, "repeats": args.repeats}
    for name, base in (("reference:dense", ["enc.3"]), ("reference:llama", ["layer.2"])):
        fam = load_family(ModelConfig(name))
        fam.keep_states()
        sets = [base + [u] for u in fam.units() if u not in base]
        with fam.apply(base):
            fam.translate_many(jobs, Decoding())  # the base set's kept states, as its actor holds them
        rows: list = []
        real = greedy.head_argmax
        greedy.head_argmax = lambda head, hidden, stats=None: rows.append(hidden.clone()) or real(head, hidden, stats)
        try:
            fam.translate_group(sets, jobs, Decoding())
        finally:
            greedy.head_argmax = real
        head = fam.model.get_output_embeddings()
        seconds: dict[str, list[float]] = {"bf16": [], "fp32": [], "round_on": [], "round_off": []}
        stats: dict = {}
        with torch.inference_mode():
            same = all(torch.equal(head_argmax(head, h, stats), head(h).float().max(-1).indices) for h in rows)
            for r in range(args.repeats):
                for way in ("bf16", "fp32") if r % 2 == 0 else ("fp32", "bf16"):
                    t = time.perf_counter()
                    for h in rows:
                        head_argmax(head, h) if way == "bf16" else head(h).float().max(-1).indices
                    seconds[way].append(time.perf_counter() - t)
        hyps = {}
        for r in range(args.repeats):
            for way in ("on", "off") if r % 2 == 0 else ("off", "on"):
                os.environ["CULLMT_BF16_HEAD"] = "1" if way == "on" else "0"
                t = time.perf_counter()
                hyps[way] = fam.translate_group(sets, jobs, Decoding())
                seconds[f"round_{way}"].append(time.perf_counter() - t)
        os.environ.pop("CULLMT_BF16_HEAD", None)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        out[name] = {"base": base, "candidates": len(sets), "head_rows": sum(h.shape[0] for h in rows),
                     "recomputed_in_fp32": round(stats["recomputed"] / stats["rows"], 3),
                     "head_fp32_seconds": round(med["fp32"], 3), "head_bf16_certified_seconds": round(med["bf16"], 3),
                     "head_ratio": round(med["bf16"] / med["fp32"], 3), "same_tokens": same,
                     "round_off_seconds": round(med["round_off"], 3), "round_on_seconds": round(med["round_on"], 3),
                     "round_ratio": round(med["round_on"] / med["round_off"], 3),
                     "round_identical_outputs": hyps["on"] == hyps["off"]}
        print("head", name, out[name], flush=True)
    return {"head": out}


# one process's lockstep race rounds (part heap): printed as one JSON line
HEAP_PROBE = """
import hashlib, json, resource, sys, time
import torch
from cullmt_ray.config import Decoding, ModelConfig
from cullmt_ray.data import load_devset, parse_directions
from cullmt_ray.families import load_family
from cullmt_ray.heap import keep_heap
name, base, chunk, repeats = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
dev = load_devset("builtin:demo")
dirs = parse_directions("english-centric", list(dev.lines))
fam = load_family(ModelConfig(name))
kept = keep_heap()  # after loading, as the actor does
fam.keep_states()
sets = [base + [u] for u in fam.units() if u not in base]
jobs = [(list(dev.lines[s][:chunk]), s, t) for s, t in dirs]
with fam.apply(base):
    fam.translate_many(jobs, Decoding())
seconds, faults = [], []
for _ in range(repeats):
    f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    hyps = fam.translate_group(sets, jobs, Decoding())
    seconds.append(time.perf_counter() - t)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
print(json.dumps({"kept": kept, "seconds": seconds, "page_faults": faults,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
                  "outputs": hashlib.sha256(repr(hyps).encode()).hexdigest()}))
"""


def part_heap(args) -> dict:
    """A CPU replica keeping freed large blocks on glibc's heap (``cullmt_ray/heap.py``, the actors' default) vs
    glibc's default (``CULLMT_KEEP_HEAP=0``): on each reference model, greedy's second-step race round in lockstep
    (``--chunk`` sentences x 6 directions, on a replica holding its base set's states) repeated in one process per
    setting, processes interleaved (``--rounds`` each); the median round after the first, page faults a round, peak
    RSS, same outputs; 1 thread."""
    out: dict = {"threads": 1, "processes_each": args.rounds, "rounds_each": args.repeats + 1}
    for name, base in (("reference:dense", ["enc.3"]), ("reference:llama", ["layer.2"])):
        runs: dict[str, list[dict]] = {"kept": [], "default": []}
        for r in range(args.rounds):
            for way in ("kept", "default") if r % 2 == 0 else ("default", "kept"):
                env = {**os.environ, "PYTHONPATH": str(REPO), "CULLMT_KEEP_HEAP": "1" if way == "kept" else "0"}
                res = subprocess.run([sys.executable, "-c", HEAP_PROBE, name, ",".join(base), str(args.chunk),
                                      str(args.repeats + 1)], env=env, capture_output=True, text=True, check=True)
                runs[way].append(json.loads(res.stdout.strip().splitlines()[-1]))
        med = {w: statistics.median(s for x in v for s in x["seconds"][1:]) for w, v in runs.items()}
        out[name] = {"base": base, "kept_applied": all(x["kept"] for x in runs["kept"]),
                     "round_kept_seconds": round(med["kept"], 3), "round_default_seconds": round(med["default"], 3),
                     "round_ratio": round(med["kept"] / med["default"], 3),
                     "page_faults_a_round": {w: int(statistics.median(f for x in v for f in x["page_faults"][1:]))
                                             for w, v in runs.items()},
                     "peak_rss_mib": {w: max(x["peak_rss_mib"] for x in v) for w, v in runs.items()},
                     "identical_outputs": len({x["outputs"] for v in runs.values() for x in v}) == 1}
        print("heap", name, out[name], flush=True)
    return {"heap": out}


def part_demo(args) -> dict:
    """README command 1 as a new user runs it (models installed; a fresh output folder and store)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CULLMT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="cullmt-demo-"))
    try:
        load = os.getloadavg()[0]
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cullmt_ray.cli", "-q", "search", "--set", f"output.dir={tmp}",
                        "--set", f"output.store={tmp / 's.sqlite'}"], check=True, env=env, cwd=REPO)
        wall = time.perf_counter() - t
        run = json.loads(next(tmp.glob("*/run.json")).read_text())
        out = {"wall_seconds": round(wall, 1), "search_seconds": run["wall_seconds"], "final": run["final"]["removed"],
               "evaluations": run["budget"]["evaluations"], "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
        print("demo", out, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"demo": {"command": "cullmt-ray search (README command 1, models already installed)", **out,
                     "target_seconds": 120, "target_met": out["wall_seconds"] <= 120,
                     "same_answer": out["final"] == ["enc.1", "enc.3", "enc.5"]}}


def part_bf16(args) -> dict:
    """What bf16 on this CPU would buy the greedy loop, and whether it keeps its exactness: one demo candidate
    (100 sentences x 6 English-centric directions, shared batches, 1 thread) decoded by the loop in fp32 and in
    bf16 (the loop forced on for bf16, which cullmt-ray does not do), best of ``--repeats``; and how many bf16
    outputs of the loop equal bf16 ``generate``'s per direction (rows exact, as racing and the store assume) and
    fp32's."""
    import torch

    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.families import load_family

    torch.set_num_threads(1)
    dev = load_devset("builtin:demo")
    jobs = [(list(dev.lines[s][: args.sentences]), s, t) for s, t in parse_directions("english-centric", list(dev.lines))]
    cpu = {f: bool(getattr(torch.cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")}
    out = {"cpu": cpu, "sentences": sum(len(j[0]) for j in jobs)}
    for model in args.models.split(","):
        res, hyps = {}, {}
        for dtype in ("float32", "bfloat16"):
            fam = load_family(ModelConfig(model, dtype=dtype))
            fam._greedy_here = lambda: True  # the loop in bf16 too, for this measurement only
            units = [fam.units()[3]]
            with fam.apply(units):
                fam.translate_many(jobs[:1], Decoding())  # warm
                seconds = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    hyps[dtype] = fam.translate_many(jobs, Decoding())
                    seconds.append(time.perf_counter() - t)
                res[f"{dtype}_loop_seconds"] = round(min(seconds), 3)
                if dtype == "bfloat16":
                    fam.fast_greedy = False  # bf16 generate, one direction at a time in plain batches
                    gen = [fam.translate(*j, Decoding()) for j in jobs]
            if dtype == "bfloat16":  # the unpruned model too: exactness in bf16 varies with the numbers
                fam.fast_greedy = True
                loop_full = fam.translate_many(jobs, Decoding())
                fam.fast_greedy = False
                gen_full = [fam.translate(*j, Decoding()) for j in jobs]
            del fam
        same = lambda a, b: sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))  # noqa: E731
        res.update(candidate="+".join(units), bf16_over_fp32=round(res["bfloat16_loop_seconds"] / res["float32_loop_seconds"], 3),
                   bf16_loop_equals_bf16_generate=f"{same(hyps['bfloat16'], gen)}/{out['sentences']}",
                   bf16_loop_equals_bf16_generate_unpruned=f"{same(loop_full, gen_full)}/{out['sentences']}",
                   bf16_equals_fp32=f"{same(hyps['bfloat16'], hyps['float32'])}/{out['sentences']}")
        out[model.split(":")[-1]] = res
        print("bf16", model, res, flush=True)
    return {"bf16": out}


# ----------------------------------------------------------------------------- scale
NLLB_600M = dict(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                 scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                 dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                bos_token_id=128000, eos_token_id=128001, pad_token_id=128004)


def _random_model(kind: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, M2M100Config, M2M100ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "nllb600m":
        conf, cls = M2M100Config(**NLLB_600M), M2M100ForConditionalGeneration
    else:
        conf, cls = LlamaConfig(**LLAMA_1B), LlamaForCausalLM
    with torch.device("meta"):
        model = cls(conf)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():  # rotary inv_freq, sinusoidal positions: recompute properly
            pass
    if kind != "nllb600m":
        model.model.rotary_emb.__init__(conf)
    else:
        for part in (model.model.encoder, model.model.decoder):
            pos = part.embed_positions
            pos.make_weights(conf.max_position_embeddings + pos.offset, conf.d_model, conf.pad_token_id)
    model.tie_weights()
    return model.eval()


def part_scale(args) -> dict:
    import psutil
    import torch

    from cullmt_ray.families.decoder import DecoderOnlyFamily
    from cullmt_ray.families.encdec import EncoderDecoderFamily
    from cullmt_ray.tiny import tokenizer

    torch.set_num_threads(args.threads)
    proc = psutil.Process()
    tok = tokenizer()
    out = {"threads": args.threads}
    for kind in ("nllb600m", "llama1b"):
        src_len, new_tokens, batch = (32, 32, 8) if kind == "nllb600m" else (16, 16, 4)
        gc.collect()
        rss_before = proc.memory_info().rss
        t = time.perf_counter()
        model = _random_model(kind)
        build = time.perf_counter() - t
        fam = (EncoderDecoderFamily if kind == "nllb600m" else DecoderOnlyFamily)(model, tok, kind)
        units = fam.units()
        nbytes = fam.size().bytes
        gc.collect()
        rss0 = proc.memory_info().rss
        rng = random.Random(0)
        sets = [rng.sample(units, rng.randint(1, len(units) // 4)) for _ in range(100)]
        ids = torch.randint(4, min(model.config.vocab_size, 30000), (batch, src_len))
        tgt = torch.randint(4, min(model.config.vocab_size, 30000), (batch, new_tokens))
        times, rss = [], []
        for i, s in enumerate(sets):
            t = time.perf_counter()
            with fam.apply(s):
                if i % 25 == 0:  # a forward inside every 25th candidate: the replica really runs
                    with torch.inference_mode():
                        _forward(model, kind, ids[:1, :8], tgt[:1, :8])
            times.append(time.perf_counter() - t)
            rss.append(proc.memory_info().rss)
        applies = [x for i, x in enumerate(times) if i % 25]

        def decode(removed=(), dtype=None):
            with fam.apply(removed), torch.inference_mode():
                t = time.perf_counter()
                _generate(model, kind, ids, new_tokens)
                return (time.perf_counter() - t) / batch

        def kl_pass(removed=()):
            with torch.inference_mode():
                t = time.perf_counter()
                full = torch.log_softmax(_forward(model, kind, ids, tgt).float(), -1)
                t_full = time.perf_counter() - t
                with fam.apply(removed):
                    t = time.perf_counter()
                    lp = torch.log_softmax(_forward(model, kind, ids, tgt).float(), -1)
                    t_pruned = time.perf_counter() - t
                (full.exp() * (full - lp)).sum(-1).mean()
                return t_full / batch, t_pruned / batch

        decode()  # warm-up
        half = units[: len(units) // 4] + (units[len(units) // 2 : len(units) // 2 + len(units) // 4]
                                           if kind == "nllb600m" else units[len(units) // 4 : len(units) // 2])
        d_full, d_half, k_full = [], [], []
        for _ in range(args.repeats):  # interleaved
            d_full.append(decode())
            d_half.append(decode(half))
            k_full.append(kl_pass(half))
        d_full, d_half = statistics.median(d_full), statistics.median(d_half)
        kl_full = statistics.median(k[0] for k in k_full)
        kl_pruned = statistics.median(k[1] for k in k_full)
        per_layer = (d_full - d_half) / len(half)
        fixed = d_full - per_layer * len(units)
        res = {"shape": NLLB_600M if kind == "nllb600m" else {k: v for k, v in LLAMA_1B.items() if k != "rope_parameters"},
               "params_m": round(fam.size().params / 1e6, 1), "model_mib": round(nbytes / 2**20, 1),
               "build_seconds": round(build, 1),
               "rss_replica_mib": round((rss0 - rss_before) / 2**20, 1), "rss_start_mib": round(rss0 / 2**20, 1),
               "rss_growth_over_100_candidates_mib": round((max(rss) - rss0) / 2**20, 2),
               "apply_restore_ms_mean": round(statistics.mean(applies) * 1e3, 3),
               "apply_restore_ms_max": round(max(applies) * 1e3, 3),
               "decode_seconds_per_sentence_full": round(d_full, 4),
               f"decode_seconds_per_sentence_{len(half)}_removed": round(d_half, 4),
               "decode_seconds_per_layer_per_sentence": round(per_layer, 5),
               "decode_seconds_fixed_per_sentence": round(fixed, 4),
               "kl_seconds_per_sentence_full_pass": round(kl_full, 4),
               "kl_seconds_per_sentence_pruned_pass": round(kl_pruned, 4),
               "kl_cached_over_decode": round(kl_pruned / d_half, 3),
               "kl_uncached_over_decode": round((kl_full + kl_pruned) / d_half, 3),
               "fixed_lengths": {"source_tokens": src_len, "target_tokens": new_tokens, "batch": batch}}
        print(kind, res, flush=True)
        if args.bf16:  # a small fixed decode (2 sentences, 8 tokens), fp32 then bf16
            def small():
                with torch.inference_mode():
                    t = time.perf_counter()
                    _generate(model, kind, ids[:2, :16], 8)
                    return time.perf_counter() - t

            small()
            f32 = min(small() for _ in range(2))
            model.to(torch.bfloat16)
            small()
            b16 = min(small() for _ in range(2))
            res["small_decode_seconds_fp32_vs_bf16"] = [round(f32, 3), round(b16, 3)]
            res["bf16_over_fp32"] = round(b16 / f32, 3)
        out[kind] = res
        print(kind, res, flush=True)
        del fam, model
        gc.collect()
    out["projection"] = project(out["nllb600m"], _load().get("greedy"))
    return {"scale": out}


def _forward(model, kind, ids, tgt):
    if kind == "nllb600m":
        return model(input_ids=ids, attention_mask=ids.ne(-1), decoder_input_ids=tgt).logits
    return model(input_ids=__import__("torch").cat([ids, tgt], 1)).logits


def _generate(model, kind, ids, n):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
    if kind == "nllb600m":
        return model.generate(input_ids=ids, attention_mask=ids.ne(-1), forced_bos_token_id=256047, **kw)
    return model.generate(input_ids=ids, attention_mask=ids.ne(-1), pad_token_id=model.config.pad_token_id, **kw)


def project(nllb: dict, greedy: dict | None) -> dict:
    """GPU-hours of CULL-MT's greedy on NLLB-3.3B (24+24 layers, 12 removed), plain vs racing.

    Assumptions: a full evaluation costs ``fixed + per_layer x layers kept`` (the measured ratio of the
    600M shape's fixed to per-layer decode cost, on CPU, is taken to hold on a GPU for the 3.3B); the
    anchor is the issue's 120 GPU-hours for plain greedy's ~510 evaluations; racing decodes the measured
    fraction of plain greedy's sentences (mean over the dense and llama runs of ``greedy``); steps
    take 48, 47, ..., 37 candidates (12 steps, 510 evaluations)."""
    per_layer = nllb["decode_seconds_per_layer_per_sentence"]
    fixed = max(nllb["decode_seconds_fixed_per_sentence"], 0.0)
    layers, removed = 48, 12
    cost = [(48 - k) * (fixed + per_layer * (layers - k - 1)) for k in range(removed)]
    anchor = 120.0 / sum(cost)  # GPU-hours per unit of cost
    plain = sum(cost) * anchor
    frac = None
    if greedy:
        ratios = [v["fast_over_plain"]["decoded_ratio"] for v in greedy.values()
                  if isinstance(v, dict) and "fast_over_plain" in v]
        frac = sum(ratios) / len(ratios) if ratios else None
    out = {"evaluations_plain": sum(48 - k for k in range(removed)), "gpu_hours_plain": round(plain, 1),
           "fixed_over_per_layer": round(fixed / per_layer, 2) if per_layer > 0 else None,
           "assumptions": project.__doc__.split("Assumptions: ", 1)[1].strip()}
    if frac is not None:
        out.update(racing_decoded_fraction=round(frac, 3), gpu_hours_racing=round(plain * frac, 1))
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(sentences=100)
    ap.add_argument("--parts", default="greedy,candidate,states,demo,scale")
    ap.add_argument("--models", default="reference:dense,reference:llama")
    ap.add_argument("--chunk", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="greedy: rounds of the three variants (median wall)")
    ap.add_argument("--pause", type=float, default=10.0, help="greedy: seconds between searches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 decode measurement")
    args = ap.parse_args()
    global OUT
    OUT = Path(args.out) if args.out else OUT
    res = _load()
    res.pop("benchmark", None), res.pop("when", None), res.pop("machine", None)
    for part in args.parts.split(","):
        t = time.perf_counter()
        res.update(globals()[f"part_{part}"](args))
        res.setdefault("load", {})[part] = {"loadavg_after": os.getloadavg(), "seconds": round(time.perf_counter() - t, 1),
                                            "cpu": cpu_model()}  # the parts kept from earlier runs keep theirs
        save("speed", res, str(OUT))


if __name__ == "__main__":
    main()
