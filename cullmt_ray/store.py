"""Persistent results: every evaluation in SQLite (WAL), keyed by context and candidate.

The *context* is everything that makes two evaluations comparable: model, dev set content,
directions, metric signatures, decoding settings and dtype. Within a context, a candidate is
evaluated once, ever: across strategies, runs and crashes. Each row is committed as soon as
its evaluation finishes, so a killed search loses at most the evaluations in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .candidate import Candidate
from .data import dumps_canonical

SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    context TEXT PRIMARY KEY,
    description TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    context TEXT NOT NULL REFERENCES contexts(context),
    candidate TEXT NOT NULL,
    units TEXT NOT NULL,          -- JSON list of removed units
    n_removed INTEGER NOT NULL,
    params INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    score REAL NOT NULL,          -- primary metric, mean over the context's directions
    metrics TEXT NOT NULL,        -- JSON {metric: {direction: score, ..., "mean": score}}
    sentences INTEGER NOT NULL,   -- sentences generated (the budget unit)
    seconds REAL NOT NULL,        -- evaluation wall time on the actor
    strategy TEXT,
    run TEXT,
    actor TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (context, candidate)
);
"""


@dataclass(frozen=True)
class Evaluation:
    """One scored candidate."""

    candidate: Candidate
    score: float
    params: int
    bytes: int
    metrics: dict
    sentences: int
    seconds: float
    strategy: str | None = None
    run: str | None = None
    actor: str | None = None
    cached: bool = field(default=False, compare=False)

    def as_row(self) -> dict:
        return {"candidate": self.candidate.key, "units": self.candidate.units, "n_removed": len(self.candidate),
                "params": self.params, "bytes": self.bytes, "score": self.score, "metrics": self.metrics,
                "sentences": self.sentences, "seconds": self.seconds, "strategy": self.strategy,
                "run": self.run, "actor": self.actor}


def context_key(description: dict) -> str:
    return hashlib.sha256(dumps_canonical(description).encode()).hexdigest()[:16]


class ResultStore:
    """SQLite-backed store; safe for one writer process (the driver) and many readers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def register_context(self, description: dict) -> str:
        key = context_key(description)
        self.db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)", (key, dumps_canonical(description)))
        return key

    def context_description(self, context: str) -> dict:
        row = self.db.execute("SELECT description FROM contexts WHERE context=?", (context,)).fetchone()
        if row is None:
            raise KeyError(f"context {context} is not in {self.path}")
        return json.loads(row[0])

    def get(self, context: str, candidate: Candidate) -> Evaluation | None:
        row = self.db.execute("SELECT * FROM evaluations WHERE context=? AND candidate=?",
                              (context, candidate.key)).fetchone()
        return self._from_row(row, cached=True) if row else None

    def put(self, context: str, ev: Evaluation) -> None:
        """Insert atomically; a candidate already stored keeps its first evaluation."""
        r = ev.as_row()
        self.db.execute(
            "INSERT OR IGNORE INTO evaluations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (context, r["candidate"], json.dumps(r["units"]), r["n_removed"], r["params"], r["bytes"],
             r["score"], json.dumps(r["metrics"]), r["sentences"], r["seconds"], r["strategy"], r["run"],
             r["actor"], time.time()))

    def evaluations(self, context: str | None = None, run: str | None = None) -> Iterator[Evaluation]:
        sql, args = "SELECT * FROM evaluations WHERE 1=1", []
        if context:
            sql, args = sql + " AND context=?", args + [context]
        if run:
            sql, args = sql + " AND run=?", args + [run]
        for row in self.db.execute(sql + " ORDER BY created", args):
            yield self._from_row(row, cached=True)

    def count(self, context: str | None = None) -> int:
        if context:
            return self.db.execute("SELECT COUNT(*) FROM evaluations WHERE context=?", (context,)).fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]

    @staticmethod
    def _from_row(row, cached: bool) -> Evaluation:
        (_ctx, _key, units, _n, params, nbytes, score, metrics, sentences, seconds, strategy, run, actor,
         _created) = row
        return Evaluation(Candidate.of(json.loads(units)), score, params, nbytes, json.loads(metrics), sentences,
                          seconds, strategy, run, actor, cached=cached)
