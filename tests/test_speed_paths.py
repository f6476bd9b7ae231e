"""The speed paths of issue 15 give the plain paths' answers: racing (same greedy decisions and scores),
block decoding (a race chunk decodes as a full evaluation does), the encoder-output cache (same
translations) and the KL cache (same KL)."""

from __future__ import annotations

import contextlib
import json
import random
import sys

import numpy as np
import pandas as pd
import pytest

from cullmt_ray.racing import _bootstrap, bleu_from_stats, next_stop, off_front, race_round

from .conftest import search_config, write_self_reference_devset


def test_vectorised_bleu_equals_sacrebleu_on_resampled_sentences(demo_sources):
    from sacrebleu.metrics import BLEU

    refs = demo_sources
    hyps = [r if i % 3 else " ".join(r.split()[:-2]) for i, r in enumerate(refs)]
    hyps[1], hyps[4] = "x", ""
    bleu = BLEU()
    stats = np.array(bleu._extract_corpus_statistics(hyps, [refs]))
    rng = random.Random(0)
    for _ in range(20):
        idx = [rng.randrange(len(refs)) for _ in range(rng.randint(1, len(refs)))]
        want = bleu.corpus_score([hyps[i] for i in idx], [[refs[i] for i in idx]]).score
        assert bleu_from_stats(stats[idx].sum(axis=0)) == pytest.approx(want, abs=1e-9)


def _rounds(n: int, chunk: int) -> list[int]:
    seen, stops = 0, []
    while seen < n:
        seen = next_stop(seen, n, chunk)
        stops.append(seen)
    return stops


def test_race_chunks_grow_with_the_sentences_seen():
    """Fixed chunks while few sentences are seen (the demo's 100: 20, 40, 60, 80, 100), then half the seen
    sentences at a time, in multiples of the chunk: a FLORES-sized dev set (1012) races in 11 rounds, not 51."""
    assert _rounds(100, 20) == [20, 40, 60, 80, 100]
    big = _rounds(1012, 20)
    assert big == [20, 40, 60, 80, 120, 180, 260, 380, 560, 840, 1012]
    assert all((b - a) % 20 == 0 and b - a <= max(20, a // 2) for a, b in zip([0, *big[:-2]], big[:-1]))
    assert _rounds(7, 20) == [7] and _rounds(45, 10) == [10, 20, 30, 40, 45]


def test_race_round_drops_only_the_clearly_worse():
    good = np.tile([20, 20, 20, 19, 18, 17, 20, 19, 18, 17], (40, 1))  # every sentence a perfect match
    bad = good.copy()
    bad[:, 2:6] //= 3  # a third of the matches in every sentence
    close = good.copy()
    close[7, 2:6] -= 1  # one sentence slightly worse: not clearly worse
    d = ("eng_Latn", "deu_Latn")
    res = race_round({"a": {d: good}, "twin": {d: good.copy()}, "bad": {d: bad}, "close": {d: close}}, [d], "spbleu")
    assert res.out == {"bad": "worse than the leader"}
    assert res.scores["a"] == res.scores["twin"] == pytest.approx(100.0) and res.scores["close"] < 100.0
    # beam: the best `keep` are never dropped; a floor above a candidate drops it as below the threshold
    assert race_round({"a": {d: good}, "bad": {d: bad}}, [d], "spbleu", keep=2).out == {}
    res = race_round({"a": {d: good}, "close": {d: close}}, [d], "spbleu", floor=99.95)
    assert res.out == {} and res.scores["close"] < 99.95  # not clearly below it: one sentence behind
    # a floor above the leader too decides nothing (the step accepts nothing either way): only the clearly worse leave
    res = race_round({"a": {d: good}, "close": {d: close}, "bad": {d: bad}}, [d], "spbleu", floor=100.5)
    assert res.out == {"bad": "worse than the leader"}
    # each candidate's upper bound (the front check's): at least its point score, at most a perfect score
    assert res.scores["close"] <= res.upper["close"] <= 100.0 and res.upper["a"] == pytest.approx(100.0)
    # a candidate steady a little below a leader of mixed sentences: not clearly worse than it, but clearly below a
    # floor under the leader; a floor above the leader as well decides nothing
    mixed = good.copy()
    mixed[:, 2:6] = (good[:, 2:6] * np.random.default_rng(5).uniform(0.5, 1.0, size=(40, 1))).astype(int)
    steady = good.copy()
    steady[:, 2:6] = (good[:, 2:6] * 0.7).astype(int)
    stats = {"mixed": {d: mixed}, "steady": {d: steady}}
    lead = race_round(stats, [d], "spbleu").scores["mixed"]
    assert race_round(stats, [d], "spbleu").out == {}
    assert race_round(stats, [d], "spbleu", floor=lead - 2).out == {"steady": "below the threshold"}
    assert race_round(stats, [d], "spbleu", floor=lead + 8).out == {}
    res = race_round({"a": {d: good}, "bad": {d: bad}}, [d], "spbleu")
    assert res.scores["bad"] <= res.upper["bad"] < res.scores["a"]  # every sentence alike: no spread


def test_race_round_asks_about_the_whole_dev_set_when_it_knows_its_size():
    """With the dev set's size, a draw is the seen sentences plus unseen ones drawn from a resample: its spread
    shrinks as more of the dev set is seen (about the plain bootstrap's while little is seen), so a candidate the plain bootstrap keeps late in a race leaves; one
    behind on a single seen sentence (level on the rest) stays: the plain bootstrap must agree (GUARD)."""
    rng = np.random.default_rng(5)
    good = np.tile([20, 20, 20, 19, 18, 17, 20, 19, 18, 17], (80, 1))
    noisy = good.copy()
    noisy[:, 2:6] = (good[:, 2:6] * rng.uniform(0.5, 1.0, size=(80, 1))).astype(int)  # sentences of mixed quality
    d = ("eng_Latn", "deu_Latn")
    spread = {t: float(np.std(_bootstrap({"n": {d: noisy}}, [d], "spbleu", 2000, 0, total=t)[1]))
              for t in (None, 100, 160, 8000)}
    assert spread[100] < 0.6 * spread[None] and spread[100] < spread[160] < spread[None]
    assert spread[8000] == pytest.approx(spread[None], rel=0.05)  # a small part seen: the plain bootstrap's
    # a candidate a little behind on many sentences: kept on 80 of 8000, out on 80 of 100
    behind = noisy.copy()
    behind[::4, 2:6] = (noisy[::4, 2:6] * np.random.default_rng(1).uniform(0.97, 1.0, size=(20, 1))).astype(int)
    behind[1::9, 2:6] = np.minimum(noisy[1::9, 2:6] + 1, noisy[1::9, 6:10])  # ahead on a few
    stats = {"n": {d: noisy}, "behind": {d: behind}}
    assert race_round(stats, [d], "spbleu").out == {} and race_round(stats, [d], "spbleu", total=8000).out == {}
    assert race_round(stats, [d], "spbleu", total=100).out == {"behind": "worse than the leader"}
    # behind on one sentence only: every draw of the unseen sentences keeps it behind; the guard keeps it in
    one = good.copy()
    one[7, 2:6] -= 1
    assert race_round({"a": {d: good}, "one": {d: one}}, [d], "spbleu", total=100).out == {}
    assert off_front({"one": {d: one}, "a": {d: good}}, [d], "spbleu", total=100) is None


def test_off_front_needs_a_clear_paired_gap_or_a_line_above():
    rng = np.random.default_rng(3)
    good = np.tile([20, 20, 20, 19, 18, 17, 20, 19, 18, 17], (40, 1))
    noisy = good.copy()
    noisy[:, 2:6] = (noisy[:, 2:6] * rng.uniform(0.55, 1.0, size=(40, 1))).astype(int)  # sentences of mixed quality
    worse = noisy.copy()
    worse[:, 2:6] = (worse[:, 2:6] * 0.8).astype(int)  # the same sentences, each a little worse: paired, clear
    d = ("eng_Latn", "deu_Latn")
    assert off_front({"w": {d: worse}, "n": {d: noisy}}, [d], "spbleu") == "n"
    assert off_front({"n": {d: noisy}, "w": {d: worse}}, [d], "spbleu") is None  # ahead of the other: on
    assert off_front({"n": {d: noisy}, "twin": {d: noisy.copy()}}, [d], "spbleu") is None  # a tie is no gap
    point = float(bleu_from_stats(noisy.sum(axis=0)))
    assert off_front({"n": {d: noisy}}, [d], "spbleu", line=point + 30) == point + 30  # far below a full score
    assert off_front({"n": {d: noisy}}, [d], "spbleu", line=point) is None  # at it: not clearly below


@pytest.fixture(scope="module")
def fam(tiny_encdec):
    from cullmt_ray.config import ModelConfig
    from cullmt_ray.families import load_family

    family = load_family(ModelConfig(str(tiny_encdec)))
    family.keep_states()  # as an evaluator actor does
    return family


@pytest.mark.parametrize("beams", [1, 2])
def test_encoder_cache_gives_the_same_translations(fam, demo_sources, beams):
    from cullmt_ray.config import Decoding

    dec = Decoding(num_beams=beams, batch_size=5, max_new_tokens=20)
    fam.decode_rows = 5  # the greedy loop's batches by tokens: 5 sentences each here too
    try:
        _encoder_cache_checks(fam, demo_sources, dec)
    finally:
        del fam.decode_rows


def _encoder_cache_checks(fam, demo_sources, dec):
    cache, fam.encoder_cache = fam.encoder_cache, None
    try:
        with fam.apply(["dec.0"]):
            plain = fam.translate(demo_sources, "eng_Latn", "deu_Latn", dec)
    finally:
        fam.encoder_cache = cache
    cache.clear()
    for removed in (["dec.0"], ["dec.0"], ["dec.1"]):  # fills, hits, hits for another decoder-only set
        with fam.apply(removed):
            got = fam.translate(demo_sources, "eng_Latn", "deu_Latn", dec)
        if removed == ["dec.0"]:
            assert got == plain
    assert cache.hits >= 2 * 3 and cache.misses == 3  # 3 batches (5, 5, 2 sources)
    cache, fam.encoder_cache = fam.encoder_cache, None
    try:
        with fam.apply(["enc.0", "dec.1"]):
            plain = fam.translate(demo_sources[:3], "eng_Latn", "deu_Latn", dec)
    finally:
        fam.encoder_cache = cache
    with fam.apply(["enc.0"]):  # an encoder unit removed: that encoder's own entry
        fam.translate(demo_sources[:3], "eng_Latn", "deu_Latn", dec)
    assert cache.misses == 4
    hits = cache.hits
    with fam.apply(["enc.0", "dec.1"]):  # a decoder unit added to it (a greedy step's candidate): its encoder is shared
        assert fam.translate(demo_sources[:3], "eng_Latn", "deu_Latn", dec) == plain
    assert cache.misses == 4 and cache.hits == hits + 1


def test_kl_cache_equals_recomputation(fam, tiny_llama, demo_sources):
    from cullmt_ray.config import ModelConfig
    from cullmt_ray.families import load_family
    from cullmt_ray.proxies import full_targets, kl_cached, kl_to_full

    refs = demo_sources[::-1]
    for family in (fam, load_family(ModelConfig(str(tiny_llama)))):
        batches = [family.teacher_forced(demo_sources[i : i + 5], refs[i : i + 5], "eng_Latn", "deu_Latn")
                   for i in range(0, len(demo_sources), 5)]
        exact = [full_targets(family, b) for b in batches]
        assert all(idx is None for _, idx in exact)  # small vocabulary: exact targets
        topk = [full_targets(family, b, k=64) for b in batches]
        for removed in ([family.units()[0]], family.units()[1:3]):
            want = kl_to_full(family, batches, removed)
            assert kl_cached(family, batches, exact, removed) == pytest.approx(want, rel=1e-6)
            assert -1e-8 <= kl_cached(family, batches, topk, removed) <= want * (1 + 1e-6) + 1e-8  # a lower bound


def test_a_race_chunk_decodes_as_the_full_evaluation(tiny_llama, demo_sources, tmp_path):
    from cullmt_ray.config import ModelConfig
    from cullmt_ray.data import load_devset
    from cullmt_ray.evaluator import EvalSettings, EvaluatorActor
    from cullmt_ray.metrics import Scorer

    dev = load_devset(str(write_self_reference_devset(tiny_llama, tmp_path / "dev", demo_sources)))
    d = ("eng_Latn", "deu_Latn")
    actor = EvaluatorActor(ModelConfig(str(tiny_llama)), dev, EvalSettings(metrics=("spbleu", "bleu"), spm="reference", block=5),
                           1, "t")
    back = ("deu_Latn", "eng_Latn")
    full = actor.evaluate(["layer.1"], [d, back])
    chunks = [actor.sentence_stats(["layer.1"], [d, back], s, min(s + 5, len(dev))) for s in range(0, len(dev), 5)]
    for i, (dd, tgt) in enumerate(((d, "deu_Latn"), (back, "eng_Latn"))):
        assert all(c["directions"][i] == dd for c in chunks)
        name = "-".join(dd)
        hyps = [h for c in chunks for h in c["parts"][i]["hyps"]]
        assert Scorer(spm="reference", metrics=("spbleu", "bleu")).score(hyps, list(dev.lines[tgt])) == \
            {m: full["metrics"][m][name] for m in ("spbleu", "bleu")}
        stats = np.array([s for c in chunks for s in c["parts"][i]["stats"]])
        assert round(float(bleu_from_stats(stats.sum(axis=0))), 4) == full["metrics"]["spbleu"][name]


@pytest.mark.parametrize("model", ["tiny_encdec", "tiny_llama"])
def test_racing_greedy_makes_plain_greedys_decisions(ray_cluster, model, demo_sources, tmp_path, request):
    from cullmt_ray.candidate import Candidate
    from cullmt_ray.search import run_search
    from cullmt_ray.store import ResultStore

    path = request.getfixturevalue(model)
    dev = write_self_reference_devset(path, tmp_path / "dev", demo_sources)
    runs = {}
    fronts = {}
    # racing is on by default here (auto: greedy, rows exact on CPU)
    for name, extra in (("plain", {"search__racing": "false"}), ("race", {"search__racing_chunk": 4})):
        cfg = search_config(tmp_path / name, path, dev, search__threshold=5.0, **extra)
        run = run_search(cfg)
        runs[name] = (json.loads((run / "trace.json").read_text()), json.loads((run / "run.json").read_text()))
        fronts[name] = pd.read_csv(run / "pareto.csv")
    (plain, plain_info), (race, race_info) = runs["plain"], runs["race"]
    assert "racing" not in plain_info
    assert race["final"] == plain["final"]
    assert [(s["best_unit"], s["best_score"], s["accepted"]) for s in race["steps"]] == \
        [(s["best_unit"], s["best_score"], s["accepted"]) for s in plain["steps"]]
    assert race_info["racing"] and race_info["budget"]["sentences"] < plain_info["budget"]["sentences"]
    # the raced-out candidates that could be front points were scored in full: the same front (points of equal
    # size and score are ties, either may stand for them)
    cols = ["params", "score"]
    assert fronts["race"][cols].equals(fronts["plain"][cols]), (fronts["race"][cols], fronts["plain"][cols])
    # raced-out candidates live in their own context; the calibration context holds full scores only: of
    # raced-out candidates, those scored in full at the end because they could be on the front
    completed = {Candidate.of(u) for u in race_info["racing_front_completed"]}
    with ResultStore(tmp_path / "race" / "store.sqlite") as store:
        full = {e.candidate for e in store.evaluations(race_info["context"])}
        raced = [c for c in store.contexts() if "raced" in store.context_description(c)]
        assert raced and full & {e.candidate for e in store.evaluations(raced[0])} == completed
        assert all(e.sentences == len(demo_sources) for e in store.evaluations(race_info["context"]))
        # every raced-out candidate left partial is dominated by a full evaluation even at its upper bound, or was
        # stopped on its way to the front, below one no larger than it
        fulls = list(store.evaluations(race_info["context"]))
        closed = {Candidate.of(c["removed"]): c for c in race_info["racing_front_closed"]}
        for p in store.evaluations(raced[0]):
            if p.candidate not in completed | set(closed):
                assert any(e.params <= p.params and e.score >= p.metrics["spbleu"]["upper"] for e in fulls), p
    # ... rightly: plain greedy scored every candidate of every step in full
    with ResultStore(tmp_path / "plain" / "store.sqlite") as store:
        plain_full = {e.candidate: e for e in store.evaluations(plain_info["context"])}
    # a race survivor's scores, every metric (summed statistics, cached references), are a full evaluation's
    assert {e.candidate: e.metrics for e in fulls} == {c: plain_full[c].metrics for c in {e.candidate for e in fulls}}
    for c, why in closed.items():
        assert why["seen"] < len(demo_sources)
        below = plain_full[Candidate.of(why["below"])].score if isinstance(why["below"], list) else why["below"]
        assert plain_full[c].score < below, (c, why)
        if why["by"] == "race":  # closed when it left its race: below one no larger than it
            assert plain_full[Candidate.of(why["below"])].params <= plain_full[c].params, (c, why)
    assert any(why["by"] == "race" for why in closed.values())


@pytest.mark.parametrize("model", ["tiny_encdec", "tiny_llama"])
def test_a_candidate_with_no_actor_to_itself_is_cut_by_sentences(ray_cluster, model, tmp_path, request):
    """Where rows are exact, fewer candidates than actors (the baseline) are decoded in one piece of sentences per
    actor, every direction in each, and scored from their hypotheses: every metric as one actor's whole evaluation."""
    import ray

    from cullmt_ray.candidate import BASELINE, Candidate
    from cullmt_ray.session import open_session

    units = ["enc.1"] if model == "tiny_encdec" else ["layer.1"]
    cfg = search_config(tmp_path, request.getfixturevalue(model), "builtin:demo", data__max_sentences=24,
                        data__languages="[eng_Latn, deu_Latn, fra_Latn]", data__directions="english-centric")
    with open_session(cfg, "search") as s:
        svc, es = s.service, s.calibration
        assert svc.pool.size == 2 and svc.pool.exact_rows and len(es.directions) == 4
        for cand in (BASELINE, Candidate.of(units)):
            (ev,) = svc.evaluate([cand], "check", es)
            whole = ray.get(svc.pool.actors[0].evaluate.remote(list(cand.units), es.directions))
            assert ev.metrics == whole["metrics"] and ev.score == whole["score"] and ev.params == whole["params"]
            assert ev.sentences == 24 * 4 and set(ev.actor.split(",")) == set(svc.pool.names)  # a piece on each


def test_completing_the_front_stops_a_candidate_clearly_below_a_smaller_one(ray_cluster, tiny_encdec, tmp_path):
    """A raced-out candidate the front might need races on from the sentences it saw and stops as soon as it is
    clearly below a full evaluation of at most its size (on those sentences already: before decoding any more);
    rightly: its full score is below that one's."""
    from cullmt_ray.candidate import Candidate
    from cullmt_ray.data import load_devset
    from cullmt_ray.session import open_session

    sources = list(load_devset("builtin:demo").lines["eng_Latn"][:48])
    dev = write_self_reference_devset(tiny_encdec, tmp_path / "dev", sources)
    cfg = search_config(tmp_path, tiny_encdec, dev, search__racing_chunk=4)
    small, twin, worse = Candidate.of(["enc.1", "dec.2"]), Candidate.of(["enc.1"]), Candidate.of(["enc.2", "dec.1"])
    with open_session(cfg, "search") as s:
        svc, es = s.service, s.calibration
        assert svc.racing
        # one step: two identities (every sentence as the full model's) and a real layer removed, raced out
        got = dict(zip([small, twin, worse], svc.evaluate_raced([small, twin, worse], "greedy", es)))
        assert not got[small].partial and not got[twin].partial and got[small].score == got[twin].score == 100.0
        assert got[worse].partial and got[worse].sentences < len(sources)
        assert got[small].params <= got[worse].params
        # it lost to the leader (``small``, first of the two level ones; no larger than it): off the front then
        (by_race,) = svc.front_closed
        assert by_race["by"] == "race" and by_race["removed"] == worse.units and by_race["below"] == small.units
        assert by_race["seen"] == got[worse].sentences  # one direction
        # racing on for the front (as for one closed otherwise, e.g. below the threshold) stops it the same way
        svc.front_closed.clear()
        raced = svc.store.get(svc._race_context(es).context, worse)
        spent = svc.budget.sentences
        assert svc._race_to_front([raced], [got[small], got[twin]], "greedy:front", es) == []  # stopped, not stored
        (closed,) = svc.front_closed
        assert closed["by"] == "front"
        assert closed["removed"] == worse.units and closed["below"] in (small.units, twin.units)
        # decoded on from where it left (here clearly below already on what it saw: nothing more), not to the end
        assert got[worse].sentences <= closed["seen"] < len(sources)
        assert svc.budget.sentences == spent + closed["seen"] - got[worse].sentences
        assert svc.store.get(es.context, worse) is None
        (full,) = svc.evaluate([worse], "check", es)
        assert full.score < 100.0  # below what it was found below


@pytest.fixture(scope="module")
def reference_families():
    import torch

    from cullmt_ray.config import ModelConfig
    from cullmt_ray.families import load_family

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an actor decodes (1 CPU each); and no oversubscription on a shared box
    try:
        families = {m: load_family(ModelConfig(f"reference:{m}")) for m in ("dense", "llama")}
        for family in families.values():
            family.keep_states()  # as an evaluator actor does
        yield families
    finally:
        torch.set_num_threads(threads)


# per model: dev-set jobs (llama's share sources: stems) and prune sets (the first layer removed, none removed, ...);
# the name of the lockstep loop and where its arguments hold the sets' keeps
LOCKSTEP_CASES = {
    "dense": ([("eng_Latn", "deu_Latn", 0), ("fra_Latn", "ces_Latn", 12)],
              [[], ["dec.0"], ["enc.3", "dec.5"], ["enc.1", "enc.3"], ["dec.1", "dec.2", "dec.3"]],
              "encdec", "greedy_encdec_group", 6),
    "llama": ([("eng_Latn", "deu_Latn", 0), ("eng_Latn", "fra_Latn", 0), ("ces_Latn", "eng_Latn", 12)],
              [[], ["layer.0"], ["layer.5"], ["layer.1", "layer.3"], ["layer.0", "layer.2", "layer.4"]],
              "decoder", "greedy_causal_group", 2),
}


@pytest.mark.parametrize("model,rows", [("dense", 2048), ("dense", 50), ("llama", 2048), ("llama", 80)])
def test_prune_sets_decoded_in_lockstep_translate_as_each_alone(reference_families, model, rows, monkeypatch):
    """translate_group decodes several prune sets' rows in one batch, each layer computing the rows of the sets that
    keep it (encoder sets apart, the first layer removed, none removed): every translation is the one of its set
    decoded alone, also when the sets are cut into several batches (``lockstep_rows``)."""
    import importlib

    from cullmt_ray.config import Decoding
    from cullmt_ray.data import load_devset

    fam = reference_families[model]
    assert fam.lockstep
    directions, sets, module, loop, keeps_at = LOCKSTEP_CASES[model]
    lines = load_devset("builtin:demo").lines
    jobs = [(list(lines[src][at : at + 12]), src, tgt) for src, tgt, at in directions]
    alone = []
    for r in sets:
        with fam.apply(r):
            alone.append(fam.translate_many(jobs, Decoding()))
    together = []
    where = importlib.import_module(f"cullmt_ray.families.{module}")
    real = getattr(where, loop)

    def counted(*args, **kwargs):
        together.append(len(args[keeps_at]))  # the prune sets of the batch
        return real(*args, **kwargs)

    monkeypatch.setattr(where, loop, counted)
    monkeypatch.setattr(fam, "lockstep_rows", rows)
    assert fam.translate_group(sets, jobs, Decoding()) == alone
    assert together == ([5] if rows == 2048 else [2, 2, 1])  # one batch of 24 (36) rows a set: 50 (80) hold two


def _both(family, sources, src, tgt, decoding):
    """(greedy loop, HF generate) translations of ``sources``."""
    family.fast_greedy = False
    try:
        if getattr(family, "encoder_cache", None) is not None:
            family.encoder_cache.clear()
        want = family.translate(sources, src, tgt, decoding)
    finally:
        family.fast_greedy = True
    return family.translate(sources, src, tgt, decoding), want


@pytest.mark.parametrize("model,removed", [("dense", []), ("dense", ["enc.1", "enc.3"]),
                                           ("dense", ["enc.2", "dec.0", "dec.5"]), ("llama", ["layer.1", "layer.4"])])
def test_greedy_loop_gives_generates_outputs(reference_families, model, removed):
    """The greedy loop (finished rows dropped, batches formed by tokens, each row's own token limit) gives
    HF generate's greedy outputs (batches of ``batch_size``); a race chunk decoded with the plain token limits
    gives the plain outputs."""
    from cullmt_ray.config import Decoding
    from cullmt_ray.data import load_devset

    fam = reference_families[model]
    dev = load_devset("builtin:demo")
    dec = Decoding(batch_size=4, max_new_tokens=64)
    for src, tgt in (("eng_Latn", "deu_Latn"), ("ces_Latn", "eng_Latn")):
        sources = list(dev.lines[src][:12])
        assert fam.rows_exact(src, tgt, dec)
        with fam.apply(removed):
            got, want = _both(fam, sources, src, tgt, dec)
            assert got == want and all(got)
            limits = fam.token_limits(sources, fam._limit_lengths(sources, src, tgt), dec)
            assert len(set(limits)) > 1  # several plain batches, several limits
            chunks = [h for i in range(0, len(sources), 5)
                      for h in fam.translate(sources[i : i + 5], src, tgt, dec, limits[i : i + 5])]
            assert chunks == got


def test_the_bfloat16_head_picks_float32s_tokens(reference_families, monkeypatch):
    """The head's argmax from its product in bfloat16 is float32's on every row: rows whose lead the rounding could
    undo (exact ties, near ties, a NaN row) are computed again in float32, the others (most rows of a trained model)
    are certified; off (or without native bfloat16) every row is float32's."""
    import torch

    from cullmt_ray.families.head import head_argmax, native_bf16

    torch.manual_seed(0)
    stats: dict = {}
    for d, vocab, scale in ((16, 50, 0.1), (64, 700, 1.0), (256, 3000, 5.0)):
        head = torch.nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            head.weight.mul_(scale)
            head.weight[vocab // 2 + 1] = head.weight[vocab // 2]  # an exact tie: the first index wins
            head.weight[vocab // 2 + 2] = head.weight[vocab // 2] + 1e-5 * torch.randn(d)  # near ties
            hidden = torch.randn(300, d) * scale
            hidden[:100] = 3 * head.weight[vocab // 2] + 0.01 * torch.randn(100, d)  # rows where the ties lead
            hidden[100, 0] = float("nan")
            assert torch.equal(head_argmax(head, hidden, stats), head(hidden).float().max(-1).indices)
            assert torch.equal(head_argmax(head, hidden[:7, None]), head(hidden[:7, None]).float().max(-1).indices)
    fam = reference_families["llama"]
    head = fam.model.get_output_embeddings()
    with torch.no_grad():  # hidden states of the kind the trained head sees: a decoder's normed outputs
        ids = fam.tokenizer(["A man rides a bike.", "Zwei Hunde spielen im Schnee."], return_tensors="pt",
                            padding=True)["input_ids"]
        hidden = fam.model.get_decoder()(input_ids=ids).last_hidden_state.reshape(-1, head.in_features)
        trained: dict = {}
        assert torch.equal(head_argmax(head, hidden, trained), head(hidden).float().max(-1).indices)
        monkeypatch.setenv("CULLMT_BF16_HEAD", "0")
        off: dict = {}
        assert torch.equal(head_argmax(head, hidden, off), head(hidden).float().max(-1).indices)
    assert off["recomputed"] == off["rows"] == hidden.shape[0]
    if native_bf16(hidden.device):
        assert 100 <= stats["recomputed"] < stats["rows"]  # the tied rows (at least) computed again, not all
        assert trained["recomputed"] <= trained["rows"] // 2
    else:
        assert stats["recomputed"] == stats["rows"]


def test_greedy_loop_falls_back_and_beams_still_work(reference_families):
    """Beam search, and a generation config asking for a logits processor the loop lacks, decode with generate."""
    from cullmt_ray.config import Decoding
    from cullmt_ray.families.greedy import generation_config, unsupported

    fam = reference_families["dense"]
    sources = ["A man rides a red bicycle down the street.", "Two dogs play in the snow.", "A child smiles."]
    beams = Decoding(num_beams=3, batch_size=2)
    assert not fam.rows_exact("eng_Latn", "deu_Latn", beams)
    got, want = _both(fam, sources, "eng_Latn", "deu_Latn", beams)
    assert got == want and all(got)
    assert unsupported(generation_config(fam.model, repetition_penalty=1.3)) == "repetition_penalty"
    assert unsupported(generation_config(fam.model, repetition_penalty=1.0)) is None
    gc = fam.model.generation_config
    before, gc.repetition_penalty = gc.repetition_penalty, 1.3
    try:
        assert not fam.rows_exact("eng_Latn", "deu_Latn", Decoding())
        got, want = _both(fam, sources, "eng_Latn", "deu_Latn", Decoding())
        assert got == want
    finally:
        gc.repetition_penalty = before


@pytest.mark.parametrize("model,removed", [("dense", ["enc.1"]), ("dense", ["dec.2"]), ("llama", ["layer.3"])])
def test_directions_share_batches_with_the_same_outputs(reference_families, model, removed, monkeypatch):
    """translate_many pools every direction's rows into token batches (several source and target languages in
    one batch, tiny batches to force mixing, finished rows kept or dropped at once): each direction gets what it
    gets translated alone, and what HF generate gives."""
    from cullmt_ray.config import Decoding
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.families import greedy

    fam = reference_families[model]
    dev = load_devset("builtin:demo")
    dec = Decoding(batch_size=4, max_new_tokens=64)
    langs = ["eng_Latn", "deu_Latn", "fra_Latn", "ces_Latn"]
    jobs = [(list(dev.lines[s][:6]), s, t) for s, t in parse_directions("english-centric", langs)]
    with fam.apply(removed):
        alone = [fam.translate(*job, dec) for job in jobs]
        want = [_both(fam, *job, dec)[1] for job in jobs]
        assert alone == want
        monkeypatch.setattr(type(fam), "decode_tokens", 200)  # batches of ~10 rows: 3-4 directions each
        for slack in (1, 8, 10**9):  # drop finished rows never until the batch ends / now and then / at once
            monkeypatch.setattr(greedy._Rows, "slack", slack)
            assert fam.translate_many(jobs, dec) == alone


def test_directions_out_of_one_language_encode_each_source_once(reference_families):
    """The rows of an N-way parallel dev set's directions out of one language share their source: the encoder runs
    once per distinct source row, and every direction gets what it gets translated alone."""
    from cullmt_ray.config import Decoding
    from cullmt_ray.data import load_devset

    fam = reference_families["dense"]
    dev = load_devset("builtin:demo")
    dec = Decoding(batch_size=4, max_new_tokens=64)
    jobs = [(list(dev.lines[s][:6]), s, t) for s, t in
            (("eng_Latn", "deu_Latn"), ("eng_Latn", "fra_Latn"), ("eng_Latn", "ces_Latn"), ("deu_Latn", "eng_Latn"))]
    rows: list[int] = []
    hook = fam.model.get_encoder().register_forward_hook(lambda _m, _a, kw, _o: rows.append(kw["input_ids"].shape[0]),
                                                         with_kwargs=True)
    try:
        with fam.apply(["enc.4", "dec.1"]):
            fam.encoder_cache.clear()
            got = fam.translate_many(jobs, dec)
            encoded = sum(rows)
            fam.encoder_cache.clear()
            alone = [fam.translate(*job, dec) for job in jobs]
    finally:
        hook.remove()
    assert got == alone and all(all(h) for h in got)
    assert encoded == 12  # 6 English + 6 German sources for 24 rows


def test_prompts_of_one_source_into_several_languages_share_their_stem(reference_families):
    """A decoder-only model's prompts of one source into two languages run their common first tokens once: the prompt
    pass computes fewer tokens than the prompts hold, and each direction gets what it gets translated alone."""
    from cullmt_ray.config import Decoding
    from cullmt_ray.data import load_devset

    fam = reference_families["llama"]
    dev = load_devset("builtin:demo")
    dec = Decoding(batch_size=4, max_new_tokens=64)
    jobs = [(list(dev.lines["eng_Latn"][:4]), "eng_Latn", t) for t in ("deu_Latn", "fra_Latn")]
    prompt = sum(len(fam._prompt_ids([(s, src, tgt)])[0][0]) for sources, src, tgt in jobs for s in sources)
    tokens: list[int] = []
    hook = fam.model.model.layers[0].register_forward_hook(
        lambda _m, args, _o: tokens.append(args[0].shape[0] * args[0].shape[1]) if args[0].shape[1] > 1 else None)
    states, fam.prefix_states = fam.prefix_states, None  # every layer runs: the hook sees the whole prompt pass
    try:
        with fam.apply(["layer.4"]):
            got = fam.translate_many(jobs, dec)
            computed = sum(tokens)
            alone = [fam.translate(*job, dec) for job in jobs]
    finally:
        hook.remove()
        fam.prefix_states = states
    assert got == alone and all(all(h) for h in got)
    assert computed < 0.75 * prompt  # the stems once, then each row's target-language name


def test_stems_run_in_runs_of_similar_length_with_the_fewest_padded_tokens():
    """The split of the length-sorted stems is the cheapest of all splits (padded tokens + a cost per run); empty
    stems are left out."""
    import itertools

    from cullmt_ray.families.greedy import _stem_runs

    lengths = [0, 3, 30, 31, 4, 29, 12, 3, 0, 18]
    for per_run in (0, 8, 40, 10**6):
        runs = _stem_runs(lengths, per_run)
        order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: lengths[i])
        assert [i for r in runs for i in r] == order and all(runs)
        cost = lambda rs: sum(len(r) * max(lengths[i] for i in r) + per_run for r in rs)  # noqa: E731
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(runs) == best, (per_run, runs)
    assert len(_stem_runs(lengths, 10**6)) == 1  # runs that cost much: one, as one padded batch
    assert all(len({lengths[i] for i in r}) == 1 for r in _stem_runs(lengths, 0))  # free runs: no padding


def test_stems_of_different_lengths_pad_to_their_runs_longest_and_translate_the_same(reference_families):
    """Six directions' prompts: the stem pass computes fewer padded tokens than one batch padded to the longest
    stem, and every row gets the tokens it gets with its direction translated alone."""
    from cullmt_ray.config import Decoding
    from cullmt_ray.data import load_devset, parse_directions

    fam = reference_families["llama"]
    dev = load_devset("builtin:demo")
    dec = Decoding(max_new_tokens=64)
    jobs = [(list(dev.lines[s][:16]), s, t) for s, t in parse_directions("english-centric", list(dev.lines))]
    calls: list[tuple[int, int]] = []
    hook = fam.model.model.layers[0].register_forward_hook(
        lambda _m, args, _o: calls.append(tuple(args[0].shape[:2])) if args[0].shape[1] > 1 else None)
    states, fam.prefix_states = fam.prefix_states, None  # every layer runs: the hook sees the whole prompt pass
    try:
        with fam.apply(["layer.1"]):
            got = fam.translate_many(jobs, dec)
            stem_calls = calls[:-1]  # then the rows' rests
            alone = [fam.translate(*job, dec) for job in jobs]
    finally:
        hook.remove()
        fam.prefix_states = states
    assert got == alone and all(all(h) for h in got)
    stems = sum(b for b, _ in stem_calls)
    assert len(stem_calls) > 1 and stems == 16 * 4  # English stems shared by three directions
    assert sum(b * n for b, n in stem_calls) < 0.9 * stems * max(n for _, n in stem_calls)


def test_prune_sets_sharing_first_layers_replay_their_prompt_states(reference_families):
    """A decoder-only replica keeps prompt states per layer boundary: a prune set run after another on the same
    batches replays the first layers they share instead of computing them, and translates exactly as without
    (and as HF generate); states of other batches or other first layers are never replayed."""
    from cullmt_ray.candidate import Candidate
    from cullmt_ray.config import Decoding
    from cullmt_ray.data import load_devset, parse_directions
    from cullmt_ray.evaluator import prefix_order
    from cullmt_ray.families import prefix

    fam = reference_families["llama"]
    kept_before = fam.prefix_states
    dev = load_devset("builtin:demo")
    jobs = [(list(dev.lines[s][:8]), s, t) for s, t in parse_directions("english-centric", list(dev.lines))]
    other = [(list(dev.lines[s][8:14]), s, t) for s, t in parse_directions("english-centric", list(dev.lines))]
    sets = [c.units for c, _ in prefix_order([(Candidate.of(u), None) for u in
                                              (["layer.1"], ["layer.4"], ["layer.2", "layer.4"], ["layer.2", "layer.5"])])]
    assert sets == [["layer.4"], ["layer.2", "layer.5"], ["layer.2", "layer.4"], ["layer.1"]]
    dec = Decoding(batch_size=4, max_new_tokens=64)
    want = {}
    fam.prefix_states = None
    for units in sets:
        with fam.apply(units):
            want[tuple(units)] = (fam.translate_many(jobs, dec), fam.translate_many(other, dec))
            assert want[tuple(units)][0][0] == _both(fam, *jobs[0], dec)[1]  # the loop gives generate's tokens
    replayed = []
    real = prefix.shared_prefill

    @contextlib.contextmanager
    def counted(*args):
        with real(*args) as n:
            replayed.append(n)
            yield n

    try:
        fam.prefix_states = prefix.PrefixStates(512)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys.modules[type(fam).__module__], "shared_prefill", counted)
            for units in sets:
                with fam.apply(units):
                    got = fam.translate_many(jobs, dec)
                assert got == want[tuple(units)][0], units
            # layer.4 first (nothing known), then {2,5} replays layers 0-1 of layer.4's, {2,4} layers 0, 1, 3 of
            # {2,5}'s, layer.1 layer 0: one number per prompt pass (a batch's stems run in one or more)
            per_set = len(replayed) // len(sets)
            assert [set(replayed[i * per_set:(i + 1) * per_set]) for i in range(len(sets))] == [{0}, {2}, {3}, {1}]
            replayed.clear()
            with fam.apply(["layer.3"]):
                assert fam.translate_many(other, dec) == [fam.translate(*j, dec) for j in other]
            assert set(replayed) == {0}  # other batches: nothing known, nothing replayed
        assert fam.prefix_states.nbytes > 0
        fam.prefix_states = prefix.PrefixStates(0.001)  # too small to keep anything: computed as before
        with fam.apply(["layer.2", "layer.4"]):
            assert fam.translate_many(jobs, dec) == want[("layer.2", "layer.4")][0]
        assert fam.prefix_states.nbytes == 0
    finally:
        fam.prefix_states = kept_before


def test_a_family_keeps_no_states_unless_asked(demo_sources):
    """A freshly loaded family reuses nothing across calls (a model being trained or merged changes its
    weights between translations: healing validates as it trains); keep_states is for replicas whose weights
    never change."""
    import torch

    from cullmt_ray.config import Decoding, ModelConfig
    from cullmt_ray.families import load_family

    family = load_family(ModelConfig("reference:dense"))
    assert family.encoder_cache is None and load_family(ModelConfig("reference:llama")).prefix_states is None
    dec = Decoding(max_new_tokens=32)
    for removed in (["dec.4"], ["enc.4"]):  # the full encoder's output is reused by decoder-only prune sets
        with family.apply(removed):
            before = family.translate(demo_sources, "eng_Latn", "deu_Latn", dec)
        layer = family.model.model.encoder.layers[2]
        saved = layer.fc2.weight.detach().clone()
        with torch.no_grad():
            layer.fc2.weight.mul_(-3.0)
        try:
            with family.apply(removed):
                changed = family.translate(demo_sources, "eng_Latn", "deu_Latn", dec)
        finally:
            with torch.no_grad():
                layer.fc2.weight.copy_(saved)
        assert changed != before, removed  # the new weights were used, not states of the old ones


def test_two_racing_searches_on_one_store_compute_each_candidate_once(tiny_encdec, demo_sources, tmp_path):
    """Two greedy searches (racing by default) of one setting started together on one SQLite store: they
    claim candidates as plain evaluations do, a candidate the other run raced out is taken as it is, and every
    row of the store (full and raced-out evaluations) is computed by one run only; both end on one answer."""
    import os
    import subprocess
    import sys

    from cullmt_ray.store import ResultStore

    dev = write_self_reference_devset(tiny_encdec, tmp_path / "dev", demo_sources)
    store = tmp_path / "store.sqlite"
    sets = [f"model.name={tiny_encdec}", f"data.dev={dev}", "data.languages=[eng_Latn, deu_Latn]",
            "data.directions=eng_Latn-deu_Latn", "data.max_sentences=null", "metric.spm=reference",
            "search.threshold=5.0", "search.racing_chunk=4", f"output.store={store}", "resources.actors=1",
            "resources.num_cpus=1"]

    def start(name: str) -> subprocess.Popen:
        args = [a for s in [*sets, f"output.dir={tmp_path / name}", f"name={name}"] for a in ("--set", s)]
        return subprocess.Popen([sys.executable, "-m", "cullmt_ray.cli", "-q", "search", *args], cwd=tmp_path,
                                env={**os.environ, "CULLMT_NO_PROGRESS": "1"}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = [start("a"), start("b")]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    infos = [json.loads(next((tmp_path / n).glob("*/run.json")).read_text()) for n in "ab"]
    finals = [json.loads(next((tmp_path / n).glob("*/trace.json")).read_text())["final"] for n in "ab"]
    assert finals[0] == finals[1] and all("racing" in i for i in infos)
    with ResultStore(store) as st:
        rows = sum(1 for _ in st.evaluations())
        assert st.claims() == []
    assert sum(i["budget"]["evaluations"] for i in infos) == rows, ([i["budget"] for i in infos], rows)
