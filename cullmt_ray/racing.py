"""Racing the candidates of one greedy/beam step (``search.racing``): torch-free, Ray-free.

Every candidate of a step is decoded on the same first chunk of dev sentences per direction (later
chunks grow with the sentences seen, :func:`next_stop`); a candidate leaves the race as soon as a
paired bootstrap over the sentences seen so far says, with ``confidence``, that it scores below the
step's ``keep``-th best (1 for greedy, ``width`` for beam) or below the acceptance ``floor``
(baseline minus threshold), the latter only while that ``keep``-th best may be above the floor itself: once it is
clearly below too, the floor no longer tells who takes the first ``keep`` places (a greedy step then accepts nothing,
a beam keeps its width whatever their scores), and the rest leave only as worse than it, so the step ranks as plain
scoring ranks it. The rest go on to the next chunk, until ``keep`` are left or the dev set is exhausted; only those
are scored on the whole dev set.
A candidate that leaves as worse than one no larger than it is off the Pareto front by the same test that
decides the step (that one is below or on the front once it is complete). Every other one that leaves keeps an
upper bound of its score: the full score of the candidate it lost to plus the ``confidence`` quantile of their
paired bootstrap difference (or of its own bootstrap scores, if lower); at the end of a search, those whose bound
could still put them on the Pareto front race on against it or are scored in full
(:meth:`EvaluationService.complete_front`), so the front is plain greedy's wherever the steps' decisions are.

The bootstrap is Koehn's paired bootstrap (2004), the method of sacrebleu's ``--paired-bs``:
resample the seen sentences with replacement (the same draw for every candidate: paired), rescore
each candidate's corpus score from the summed per-sentence sufficient statistics, and count how
often a candidate reaches the reference. A score is the mean over directions of the per-direction
corpus score, as in a full evaluation.

Given the size of the whole dev set (``total``), the question is the one plain greedy answers, the
scores on the whole dev set, of which the seen sentences are a known part: each draw is then the seen
sentences' statistics plus those of the ``total - m`` unseen ones, drawn from a bootstrap resample of the
``m`` seen (a predictive bootstrap: the seen part is fixed, the unseen part carries the uncertainty of
both the sentence mix and the resample). Its spread shrinks as the race goes on (about
``sqrt((total - m) / total)`` of the plain bootstrap's: 0.45 with 80 of 100 sentences seen) and is
nil once every sentence is seen, so a candidate 1 BLEU below the leader need not decode every sentence.
Drawing from the seen sentences never draws a kind of sentence not seen yet: a candidate behind on a single
seen sentence, level on the rest, would be behind in every draw. So a candidate leaves only where the plain
bootstrap also puts it below in more than ``1 - GUARD`` of its draws (there it is level in a third), and the
bounds (``upper``, ``margin``) stay the plain bootstrap's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 1000
WORSE, BELOW = "worse than the leader", "below the threshold"  # why a candidate leaves a race
GUARD = 0.25  # with the dev set's size: the plain bootstrap must agree in more than 1 - GUARD of its draws


def bleu_from_stats(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-100, ``smooth_method='exp'``, 4-grams) of summed sacrebleu BLEU statistics
    ``[hyp_len, ref_len, correct_1..4, total_1..4]`` along the last axis; vectorised over the others."""
    s = np.asarray(stats, dtype=np.float64)
    hyp, ref = s[..., 0], s[..., 1]
    correct, total = s[..., 2:6], s[..., 6:10]
    log_p = np.zeros(hyp.shape)
    halve = np.ones(hyp.shape)  # 'exp' smoothing: each order without a match halves the previous floor
    for n in range(4):
        c, t = correct[..., n], np.maximum(total[..., n], 1.0)
        none = c == 0
        halve = np.where(none, halve * 2.0, halve)
        log_p += np.log(np.where(none, 1.0 / (halve * t), c / t))
    bp = np.where(hyp >= ref, 1.0, np.exp(1.0 - ref / np.maximum(hyp, 1e-9)))
    score = 100.0 * bp * np.exp(log_p / 4.0)
    return np.where((hyp > 0) & (total.min(axis=-1) > 0), score, 0.0)


def corpus_score(metric_name: str, summed: np.ndarray, sacre=None) -> np.ndarray:
    """Corpus score of summed statistics: BLEU-family vectorised; others through sacrebleu's metric object."""
    if metric_name in ("spbleu", "bleu"):
        return bleu_from_stats(summed)
    flat = summed.reshape(-1, summed.shape[-1])
    out = np.array([sacre._compute_score_from_stats(list(map(float, row))).score for row in flat])
    return out.reshape(summed.shape[:-1])


def next_stop(seen: int, n: int, chunk: int) -> int:
    """Where the next round of a race stops: ``chunk`` sentences per direction at first, then as many multiples of
    ``chunk`` as make half the sentences seen so far (20, 40, 60, 80, 120, 180, 260, ... for chunk 20), so a race
    over ``n`` sentences takes O(log n) rounds, not n / chunk: fewer barriers and fuller batches on large dev sets,
    each decision at most half as many sentences later than with fixed chunks. Chunks stay multiples of ``chunk``
    (block decoding decodes blocks of ``chunk``)."""
    return min(n, seen + chunk * max(1, seen // (2 * chunk)))


@dataclass
class RoundResult:
    scores: dict  # candidate -> mean over directions of the corpus score on the seen sentences
    out: dict  # candidate -> why it left the race ("worse than the leader" / "below the threshold")
    upper: dict  # candidate -> the ``confidence`` quantile of its bootstrap scores (a bound for the front)
    # candidate that left -> (the candidate it was compared with, the ``confidence`` quantile of its paired
    # bootstrap difference to it): with that one's full score, a much tighter bound
    margin: dict


def race_round(stats: dict, directions: list, metric_name: str, keep: int = 1, floor: float | None = None,
               confidence: float = 0.99, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
               sacre=None, total: int | None = None) -> RoundResult:
    """One decision of the race. ``stats[candidate][direction]`` is an ``(m, k)`` array of the seen
    sentences' statistics (the same ``m`` sentences for every candidate of a direction); candidates are
    in ask order, which breaks ties. ``total``: the sentences per direction of the whole race (decisions and
    bounds are then of the full scores, see the module doc). ``floor`` drops a candidate only while the ``keep``-th
    best is not clearly below it too. Returns the point scores, who leaves the race now and an upper bound of each
    candidate's score."""
    cands = list(stats)
    draws = _Draws.of(stats, directions, metric_name, samples, seed, sacre, confidence, total)
    point, boot = draws.point, draws.plain
    order = sorted(range(len(cands)), key=lambda i: -point[i])  # stable: ask order breaks ties
    leaders = set(order[:keep])
    ref = order[min(keep, len(cands)) - 1]
    out, margin = {}, {}
    # the floor decides only while the keep-th best may be above it: once that one is clearly below it too, the floor
    # no longer tells who takes the first keep places, and the rest race on as worse than it or not (module doc)
    floor = None if floor is None or draws.below(ref, float(floor)) else float(floor)
    for i in order[keep:]:
        if draws.below(i, ref):
            out[cands[i]] = WORSE
        elif floor is not None and draws.below(i, floor):
            out[cands[i]] = BELOW
        if cands[i] in out:
            margin[cands[i]] = (cands[ref], float(np.quantile(boot[:, i] - boot[:, ref], confidence)))
    assert not leaders & {cands.index(c) for c in out}
    return RoundResult({c: float(point[i]) for i, c in enumerate(cands)}, out,
                       {c: float(np.quantile(boot[:, i], confidence)) for i, c in enumerate(cands)}, margin)


@dataclass
class _Draws:
    """A race's bootstrap draws, in the order of its candidates, and the test of who is clearly below."""

    point: np.ndarray  # (C,) scores on the seen sentences
    plain: np.ndarray  # (samples, C): the seen sentences resampled
    full: np.ndarray  # (samples, C): predictive draws of the full scores (without ``total``: the plain ones)
    alpha: float
    guard: float  # how often the plain draws may still reach what a candidate is below

    @classmethod
    def of(cls, stats: dict, directions: list, metric_name: str, samples: int, seed: int, sacre,
           confidence: float, total: int | None) -> _Draws:
        point, plain = _bootstrap(stats, directions, metric_name, samples, seed, sacre)
        if total is None:
            return cls(point, plain, plain, 1.0 - confidence, 1.0 - confidence)
        full = _bootstrap(stats, directions, metric_name, samples, seed, sacre, total)[1]
        return cls(point, plain, full, 1.0 - confidence, GUARD)

    def below(self, i: int, line: int | float) -> bool:
        """Whether candidate ``i`` is clearly below ``line``: another candidate's column (int) or a score (float)."""
        full, plain = (self.full[:, line], self.plain[:, line]) if isinstance(line, int) else (line, line)
        return bool(np.mean(self.full[:, i] >= full) < self.alpha and np.mean(self.plain[:, i] >= plain) < self.guard)


def _bootstrap(stats: dict, directions: list, metric_name: str, samples: int, seed: int,
               sacre=None, total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Point scores ``(C,)`` and paired bootstrap scores ``(samples, C)`` of ``stats`` (as :func:`race_round`'s), in
    the order of its candidates: each draw resamples the seen sentences of every direction, the same for all; with
    ``total``, each draw is a predictive draw of the scores on all ``total`` sentences (see the module doc)."""
    cands = list(stats)
    rng = np.random.default_rng(seed)
    point = np.zeros(len(cands))
    boot = np.zeros((samples, len(cands)))
    for d in directions:
        s = np.stack([np.asarray(stats[c][d], dtype=np.float64) for c in cands])  # (C, m, k)
        n_cands, m, k = s.shape
        point += corpus_score(metric_name, s.sum(axis=1), sacre)
        draws = rng.integers(0, m, size=(samples, m))
        if total is not None:  # the seen sentences once each, plus the unseen ones drawn from the resample
            draws = np.take_along_axis(draws, rng.integers(0, m, size=(samples, max(0, total - m))), axis=1)
        # how often each draw takes each sentence (+1 for the seen ones), then the draws' summed statistics
        weights = np.bincount((draws + m * np.arange(samples)[:, None]).ravel(), minlength=samples * m)
        weights = weights.reshape(samples, m).astype(np.float64) + (0.0 if total is None else 1.0)
        summed = (weights @ s.transpose(1, 0, 2).reshape(m, n_cands * k)).reshape(samples, n_cands, k)
        boot += corpus_score(metric_name, summed, sacre)
    return point / len(directions), boot / len(directions)


def off_front(stats: dict, directions: list, metric_name: str, line: float | None = None,
              confidence: float = 0.99, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, sacre=None,
              total: int | None = None):
    """Whether the first candidate of ``stats`` (``stats[candidate][direction]``, seen sentences, the same for all)
    is, with ``confidence``, below one of the others (paired bootstrap: its score reaches theirs in fewer than
    ``1 - confidence`` of the draws) or below ``line`` (a full score it must beat): the candidate (key) or the line
    (float) it is below, else None; with ``total``, of their scores on all ``total`` sentences (see the module doc).
    Completing a raced search's Pareto front (:meth:`EvaluationService.complete_front`) stops a candidate this way
    when the others are no larger."""
    cands = list(stats)
    draws = _Draws.of(stats, directions, metric_name, samples, seed, sacre, confidence, total)
    for j, other in enumerate(cands[1:], start=1):
        if draws.below(0, j):
            return other
    if line is not None and draws.below(0, float(line)):
        return float(line)
    return None
