"""spBLEU, chrF++ and BLEU through sacrebleu; every score carries its sacrebleu signature.

spBLEU is BLEU over SentencePiece pieces. sacrebleu's ``flores200`` tokenizer downloads its
SPM on first use; where that is impossible, pass a local SentencePiece model path (or
``reference`` for the model shipped with cullmt-ray). The signature then says
``tok:spm[<file>#<sha8>]`` so such scores are never mistaken for flores200 ones.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_base import BaseTokenizer
from sacrebleu.utils import sum_of_lists

REFERENCE_SPM = "reference"


@dataclass(frozen=True)
class Metric:
    """What a score means: its name, its direction, and whether it needs translations.

    A search ranks candidates by :meth:`ranked` (higher is better for every metric); the decoded
    metrics' signatures come from sacrebleu (:meth:`Scorer.signatures`), the KL proxy's is fixed.
    """

    name: str
    higher_is_better: bool = True
    decoded: bool = True  # computed from translations (else teacher-forced, no decoding)
    digits: int | None = 4  # rounding of per-direction and mean scores (None: unrounded, tiny KLs still rank)
    fixed_signature: str | None = None

    def ranked(self, mean: float) -> float:
        """The score a search maximises."""
        return mean if self.higher_is_better else -mean

    def rounded(self, value: float) -> float:
        return value if self.digits is None else round(value, self.digits)


KL = Metric("kl", higher_is_better=False, decoded=False, digits=None,
            fixed_signature="kl:full||pruned|teacher-forced|reference-targets|full:exact<=32768+top256-tail|unit:nats/token")
METRICS: dict[str, Metric] = {m.name: m for m in (Metric("spbleu"), Metric("chrf++"), Metric("bleu"), KL)}
DECODED = tuple(n for n, m in METRICS.items() if m.decoded)


class MetricError(ValueError):
    """A metric that cannot be computed as configured; one line that says what to do."""


class LocalSpmTokenizer(BaseTokenizer):
    """sacrebleu tokenizer over a local SentencePiece model, named by file and content hash."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        self._sig = f"spm[{path.name}#{digest}]"

    def signature(self) -> str:
        return self._sig

    @lru_cache(maxsize=2**16)
    def __call__(self, line: str) -> str:
        return " ".join(self.sp.encode(line, out_type=str))


def _flores200_path() -> Path:
    from sacrebleu.utils import SACREBLEU_DIR

    return Path(SACREBLEU_DIR) / "models" / "flores200sacrebleuspm"


def resolve_spm(spm: str) -> str | Path:
    """``flores200`` (sacrebleu's cached model) or a local model path; clear error when missing."""
    if spm == "flores200":
        if _flores200_path().exists() or os.environ.get("CULLMT_ALLOW_DOWNLOAD") == "1":
            return "flores200"
        raise MetricError(
            f"spBLEU needs the flores200 SentencePiece model, not found at {_flores200_path()} "
            "(sacrebleu downloads it when online: run `sacrebleu -tok flores200` once, or set "
            "CULLMT_ALLOW_DOWNLOAD=1), or pass a local model with metric.spm=PATH (or 'reference')")
    if spm == REFERENCE_SPM:
        return Path(str(resources.files("cullmt_ray") / "reference" / "spm" / "multi30k_spm.model"))
    path = Path(spm).expanduser()
    if not path.is_file():
        raise MetricError(f"metric.spm={spm!r}: no such SentencePiece model file; expected 'flores200', "
                          "'reference' or a path to a .model file")
    return path


SENTENCE_STATS_KEPT = 60_000  # sentences' statistics kept by a Scorer (a few dozen numbers each: ~50 MiB at most)


@dataclass
class Scorer:
    """Computes the configured metrics for one direction at a time."""

    spm: str = "flores200"
    metrics: tuple[str, ...] = DECODED

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in DECODED]
        if unknown:
            raise MetricError(f"unknown metric {unknown[0]!r}: expected one of {', '.join(DECODED)}")
        self._options = {"bleu": {}, "chrf++": {"word_order": 2}}  # what each metric is built with
        self._with_refs: dict = {}  # (metric, refs key) -> the metric with those references cached (score(key=))
        self._sentence_stats: dict = {}  # (metric, refs key, sentence, hypothesis) -> its statistics, least recent first
        self._bleu = BLEU(**self._options["bleu"])
        self._chrf = CHRF(**self._options["chrf++"])
        self._spbleu = None
        if "spbleu" in self.metrics:
            tok = resolve_spm(self.spm)
            if isinstance(tok, str):
                self._options["spbleu"] = {"tokenize": tok}
                self._spbleu = BLEU(tokenize=tok)
            else:
                self._spbleu = BLEU(tokenize="none")
                self._spbleu.tokenizer = LocalSpmTokenizer(tok)
                self._spbleu.tokenizer_signature = self._spbleu.tokenizer.signature()
        for m in self.metrics:  # sacrebleu fixes a signature's nrefs on first use
            self._metric(m).corpus_score(["a"], [["a"]])

    def _metric(self, name: str):
        return {"spbleu": self._spbleu, "chrf++": self._chrf, "bleu": self._bleu}[name]

    def signatures(self) -> dict[str, str]:
        """sacrebleu signature string of each metric, e.g. ``nrefs:1|case:mixed|...|version:2.6.0``."""
        return {m: str(self._metric(m).get_signature()) for m in self.metrics}

    def score(self, hyps: list[str], refs: list[str], key: Hashable | None = None,
              stats: dict[str, list] | None = None) -> dict[str, float]:
        """Corpus score of each metric, rounded. ``stats``: a metric's per-sentence statistics of ``hyps``, already
        computed (:meth:`sentence_stats`): its score is that of their sum, as sacrebleu computes a corpus score.
        ``key``: names ``refs`` (e.g. direction and sentence count), whose n-grams are then extracted once and
        reused by later calls with the key (sacrebleu's cached references; not for a local-SPM spBLEU)."""
        out = {}
        for m in self.metrics:
            metric = self._metric(m)
            if stats is not None and m in stats:
                score = metric._compute_score_from_stats(sum_of_lists(stats[m])).score
            elif key is not None and not (m == "spbleu" and isinstance(metric.tokenizer, LocalSpmTokenizer)):
                if (m, key) not in self._with_refs:
                    self._with_refs[m, key] = type(metric)(**self._options[m], references=[refs])
                score = self._with_refs[m, key]._compute_score_from_stats(sum_of_lists(self._stats_of(m, key, hyps))).score
            else:
                score = metric.corpus_score(hyps, [refs]).score
            out[m] = round(score, 4)
        return out

    def _stats_of(self, m: str, key: Hashable, hyps: list[str]) -> list:
        """Per-sentence statistics of ``hyps`` against the references cached under ``key`` (what sacrebleu's
        ``corpus_score`` sums), each sentence's kept: a hypothesis seen before for the same sentence (a prune set
        and the one it grew from agree on many) is not scored again. Bounded: at most ``SENTENCE_STATS_KEPT``
        sentences in all, the least recently used dropped first."""
        metric, kept = self._with_refs[m, key], self._sentence_stats
        out = []
        for i, hyp in enumerate(hyps):
            got = kept.pop((m, key, i, hyp), None)
            if got is None:
                got = metric._compute_segment_statistics(metric._preprocess_segment(hyp), metric._ref_cache[i])
                if len(kept) >= SENTENCE_STATS_KEPT:
                    kept.pop(next(iter(kept)))
            kept[m, key, i, hyp] = got
            out.append(got)
        return out

    def sentence_stats(self, hyps: list[str], refs: list[str], metric: str) -> list[list[int]]:
        """Per-sentence sufficient statistics of ``metric`` (sacrebleu's); summed, they give the corpus
        score. Racing (:mod:`cullmt_ray.racing`) bootstraps over them."""
        return [[int(x) for x in row] for row in self._metric(metric)._extract_corpus_statistics(hyps, [refs])]


def sacrebleu_version() -> str:
    return sacrebleu.__version__
