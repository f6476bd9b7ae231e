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
