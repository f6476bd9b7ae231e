"""Metrics: sacrebleu scores with signatures; spBLEU from a local SPM; clear error without one."""

from __future__ import annotations

import pytest
import sacrebleu

from cullmt_ray.metrics import MetricError, Scorer

HYP = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
REF = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee."]


def test_scores_match_sacrebleu_and_carry_signatures():
    s = Scorer(spm="reference")
    got = s.score(HYP, REF)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYP, [REF]).score, abs=1e-3)
    assert got["chrf++"] == pytest.approx(sacrebleu.corpus_chrf(HYP, [REF], word_order=2).score, abs=1e-3)
    assert 0 < got["spbleu"] < 100
    sig = s.signatures()
    assert "tok:spm[multi30k_spm.model#" in sig["spbleu"] and "tok:13a" in sig["bleu"]
    assert "nw:2" in sig["chrf++"]
    assert s.score(REF, REF)["spbleu"] == 100.0


def test_scores_with_cached_references_keep_each_sentences_statistics(monkeypatch):
    """Scored against references kept under a key, a hypothesis seen before for the same sentence is not scored
    again, and every corpus score is still sacrebleu's (its corpus_score on the same lists)."""
    from sacrebleu.metrics import CHRF

    from cullmt_ray.data import load_devset

    refs = list(load_devset("builtin:demo").lines["deu_Latn"][:30])
    first = [r if i % 2 else " ".join(reversed(r.split())) for i, r in enumerate(refs)]
    second = [h if i % 3 else h + " noch" for i, h in enumerate(first)]  # a third of the sentences differ
    want = [(round(sacrebleu.corpus_bleu(h, [refs]).score, 4), round(sacrebleu.corpus_chrf(h, [refs], word_order=2).score, 4))
            for h in (first, second, first)]
    s = Scorer(spm="reference")
    computed = []
    seg = CHRF._compute_segment_statistics
    monkeypatch.setattr(CHRF, "_compute_segment_statistics", lambda self, *a: computed.append(1) or seg(self, *a))
    for hyps, (bleu, chrf) in zip((first, second, first), want):
        got = s.score(hyps, refs, key=("deu", 30))
        assert (got["bleu"], got["chrf++"]) == (bleu, chrf)
    assert len(computed) == 30 + 10  # the first list, then the changed third of the second; the first again: none
    # bounded: with room for 25 sentences' statistics, the same scores, and no more kept than that
    monkeypatch.setattr("cullmt_ray.metrics.SENTENCE_STATS_KEPT", 25)
    small = Scorer(spm="reference")
    for hyps, (bleu, chrf) in zip((first, second, first), want):
        got = small.score(hyps, refs, key=("deu", 30))
        assert (got["bleu"], got["chrf++"]) == (bleu, chrf) and len(small._sentence_stats) <= 25


def test_flores200_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SACREBLEU", str(tmp_path))  # an empty sacrebleu cache
    import importlib

    import sacrebleu.utils

    importlib.reload(sacrebleu.utils)
    try:
        with pytest.raises(MetricError, match="flores200 SentencePiece model, not found"):
            Scorer(spm="flores200")
    finally:
        monkeypatch.delenv("SACREBLEU")
        importlib.reload(sacrebleu.utils)


def test_bad_spm_path_and_metric():
    with pytest.raises(MetricError, match="no such SentencePiece model file"):
        Scorer(spm="/no/such.model")
    with pytest.raises(MetricError, match="unknown metric 'ter'"):
        Scorer(spm="reference", metrics=("ter",))
