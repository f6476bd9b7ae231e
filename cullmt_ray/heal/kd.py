"""Sequence-level KD data: the unpruned model's translations of a parallel corpus, cached as Parquet.

The teacher (the search's full model) translates the corpus sources of every configured
direction; the jobs are spread over the evaluator actors. The cache is keyed by the model's
fingerprint, the content of the selected sentences, the directions and the decoding settings,
so a later heal (another candidate, another ablation) reuses it. Each chunk is written
atomically as it finishes (``parts/``), so a killed run resumes where it stopped; the finished
table (``kd.parquet``: one row per sentence pair) is written atomically at the end.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ..atomic import atomic_path, write_json
from ..data import DataError, DevSet, Direction, direction_name, dumps_canonical, load_devset
from ..config import Decoding

COLUMNS = ["src_lang", "tgt_lang", "line", "source", "reference", "teacher"]


def load_corpus(path: str, languages: list[str], split: str | None) -> DevSet:
    """A line-aligned parallel corpus in ``languages`` (a folder of per-language files or a table)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"corpus.path={path!r} does not exist; expected a folder of per-language files "
                        "(train.de.gz, deu_Latn.txt) or a .tsv/.jsonl/.parquet table with one column per language")
    try:
        return load_devset(str(p), languages, split)
    except DataError as e:
        raise DataError(f"corpus.path={path!r}: {e}") from None


def select_lines(n_lines: int, directions: list[Direction], max_sentences: int | None,
                 seed: int) -> dict[Direction, list[int]]:
    """Line indices per direction: ``max_sentences`` drawn with a per-direction seed (all when None)."""
    out = {}
    for d in directions:
        if max_sentences is None or max_sentences >= n_lines:
            out[d] = list(range(n_lines))
        else:
            out[d] = sorted(random.Random(f"{seed}:{direction_name(d)}").sample(range(n_lines), max_sentences))
    return out


@dataclass(frozen=True)
class KDRequest:
    """What the teacher translates; everything here is part of the cache key."""

    model: str  # model fingerprint (cullmt_ray.families.model_fingerprint)
    dtype: str
    corpus: DevSet
    directions: tuple[Direction, ...]
    max_sentences: int | None
    seed: int
    decoding: Decoding

    def description(self) -> dict:
        lines = select_lines(len(self.corpus), list(self.directions), self.max_sentences, self.seed)
        h = hashlib.sha256()
        for d in self.directions:
            for i in lines[d]:
                h.update(f"{d[0]}\x00{self.corpus.lines[d[0]][i]}\x00".encode())
        return {"kind": "sequence-kd", "model": self.model, "dtype": self.dtype, "corpus": self.corpus.source,
                "sources": h.hexdigest()[:16], "pairs": sum(len(v) for v in lines.values()),
                "directions": [direction_name(d) for d in self.directions], "max_sentences": self.max_sentences,
                "seed": self.seed, "decoding": asdict(self.decoding)}

    def key(self) -> str:
        return hashlib.sha256(dumps_canonical(self.description()).encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, request: KDRequest) -> Path:
    return Path(cache_dir) / request.key() / "kd.parquet"


def teacher_translations(pool, request: KDRequest, cache_dir: str | Path, chunk: int = 250,
                         log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """The KD table for ``request`` from the cache, or made by ``pool`` (the unpruned model) and cached.

    Returns ``(table, info)``; ``info`` says where the cache is and what was computed now.
    """
    folder = Path(cache_dir) / request.key()
    final = folder / "kd.parquet"
    desc = request.description()
    if final.exists():
        df = pd.read_parquet(final)
        return df, {"path": str(final), "key": folder.name, "pairs": len(df), "cached": True, "computed": 0}
    write_json(folder / "meta.json", desc)
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    lines = select_lines(len(request.corpus), list(request.directions), request.max_sentences, request.seed)
    chunks: list[tuple[Path, Direction, list[int]]] = []
    for d in request.directions:
        idx = lines[d]
        for c, start in enumerate(range(0, len(idx), chunk)):
            chunks.append((parts / f"{direction_name(d)}.{c:05d}.parquet", d, idx[start : start + chunk]))
    todo = [c for c in chunks if not c[0].exists()]
    if todo:
        log(f"[cullmt-ray heal] KD data: the teacher translates {sum(len(c[2]) for c in todo)} sentences "
            f"({len(chunks) - len(todo)} of {len(chunks)} chunks already cached) on {pool.size} actor(s)")
    by_path = {str(c[0]): c for c in todo}
    jobs = ((str(p), [], [request.corpus.lines[d[0]][i] for i in idx], d[0], d[1]) for p, d, idx in todo)
    for path, hyps in pool.translate_many(jobs, request.decoding):
        _, d, idx = by_path[path]
        frame = pd.DataFrame({"src_lang": d[0], "tgt_lang": d[1], "line": idx,
                              "source": [request.corpus.lines[d[0]][i] for i in idx],
                              "reference": [request.corpus.lines[d[1]][i] for i in idx], "teacher": hyps})
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    df = pd.concat([pd.read_parquet(p) for p, _, _ in chunks], ignore_index=True)[COLUMNS]
    with atomic_path(final) as tmp:
        df.to_parquet(tmp, index=False)
    shutil.rmtree(parts, ignore_errors=True)
    return df, {"path": str(final), "key": folder.name, "pairs": len(df), "cached": False,
                "computed": sum(len(c[2]) for c in todo)}


def training_pairs(kd: pd.DataFrame | None, refs: pd.DataFrame | None, mix: str) -> list[dict]:
    """Sentence pairs to train on: teacher targets (``kd``), human references (``refs``) or both."""
    out: list[dict] = []
    if mix in ("kd", "both"):
        assert kd is not None
        out += [{"src_lang": r.src_lang, "tgt_lang": r.tgt_lang, "source": r.source, "target": r.teacher}
                for r in kd.itertuples() if r.teacher.strip()]
    if mix in ("refs", "both"):
        assert refs is not None
        out += [{"src_lang": r.src_lang, "tgt_lang": r.tgt_lang, "source": r.source, "target": r.reference}
                for r in refs.itertuples()]
    return out


def reference_pairs(corpus: DevSet, directions: list[Direction], max_sentences: int | None, seed: int) -> pd.DataFrame:
    """The same sentence selection as the KD data, with the human references only (no teacher needed)."""
    lines = select_lines(len(corpus), directions, max_sentences, seed)
    rows = [{"src_lang": d[0], "tgt_lang": d[1], "line": i, "source": corpus.lines[d[0]][i],
             "reference": corpus.lines[d[1]][i], "teacher": ""} for d in directions for i in lines[d]]
    return pd.DataFrame(rows, columns=COLUMNS)
