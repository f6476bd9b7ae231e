"""Persistent results: every evaluation in SQLite (WAL), keyed by context and candidate.

The *context* is everything that makes two evaluations comparable: model, dev set content,
directions, metric signatures, decoding settings and dtype. Within a context, a candidate is
evaluated once, ever: across strategies, runs and crashes. Each row is committed as soon as
its evaluation finishes, so a killed search loses at most the evaluations in flight.

Concurrent runs on one store never compute the same candidate: a driver *claims* each candidate
it computes (owner + lease in the ``claims`` table), others wait for that row instead of
recomputing it, and a dead owner's claim expires when its lease is not renewed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .candidate import Candidate, Evaluation
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
CREATE TABLE IF NOT EXISTS claims (   -- candidates being computed now, by whom, until when
    context TEXT NOT NULL,
    candidate TEXT NOT NULL,
    owner TEXT NOT NULL,          -- host:pid:run of the driver computing it
    expires REAL NOT NULL,        -- unix time; the owner renews it while alive
    PRIMARY KEY (context, candidate)
);
"""
CLAIM_LEASE = 60.0  # seconds a claim lives unless its owner renews it (every lease/4 while alive)


def _check_file(path: Path) -> None:
    """An existing store file must be a SQLite database with cullmt-ray's tables (or none yet)."""
    if not path.is_file():
        raise StoreError(f"results store {str(path)!r} is not a file; expected a SQLite file such as "
                         "results/store.sqlite")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise StoreError(f"results store {str(path)!r} is an empty file (0 bytes): its evaluations are gone; "
                         "remove it to start a new store, or give the right --store")
    if head != b"SQLite format 3\x00":
        raise StoreError(f"results store {str(path)!r} is not a SQLite database; expected a cullmt-ray store")
    db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    try:
        tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"results store {str(path)!r}: unreadable SQLite database ({e})") from None
    finally:
        db.close()
    if tables and not {"contexts", "evaluations"} <= tables:
        raise StoreError(f"results store {str(path)!r} is a SQLite database of something else (tables "
                         f"{', '.join(sorted(tables))}); expected a cullmt-ray store")


def context_key(description: dict) -> str:
    return hashlib.sha256(dumps_canonical(description).encode()).hexdigest()[:16]


class StoreError(ValueError):
    """A results store that cannot be used; one line naming the file."""


class ResultStore:
    """SQLite-backed store; safe for one writer process (the driver) and many readers."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        if self.path.exists():
            _check_file(self.path)
        elif read_only:
            raise StoreError(f"results store {str(path)!r} does not exist")
        try:
            if read_only:
                self.db = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, timeout=30,
                                          isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"results store {str(path)!r}: cannot open it ({e})") from None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        return _json(row[0], self.path, f"context {context}")

    def contexts(self) -> list[str]:
        return [c for (c,) in self.db.execute("SELECT context FROM contexts ORDER BY rowid")]

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
        self.db.execute("DELETE FROM claims WHERE context=? AND candidate=?", (context, r["candidate"]))

    # ------------------------------------------------------------------ claims (concurrent runs)
    def claim(self, context: str, candidate: Candidate, owner: str, lease: float = CLAIM_LEASE) -> str:
        """Try to take ``candidate`` for computing: ``'stored'`` (its row exists), ``'mine'`` (claimed now,
        or already ours) or ``'taken'`` (another owner's claim that has not expired)."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("SELECT 1 FROM evaluations WHERE context=? AND candidate=?",
                               (context, candidate.key)).fetchone():
                return "stored"
            row = self.db.execute("SELECT owner, expires FROM claims WHERE context=? AND candidate=?",
                                  (context, candidate.key)).fetchone()
            if row is not None and row[0] != owner and row[1] > now and not _dead_here(row[0]):
                return "taken"
            self.db.execute("INSERT OR REPLACE INTO claims VALUES (?,?,?,?)", (context, candidate.key, owner, now + lease))
            return "mine"
        finally:
            self.db.execute("COMMIT")

    def release(self, context: str, candidate: Candidate, owner: str) -> None:
        self.db.execute("DELETE FROM claims WHERE context=? AND candidate=? AND owner=?", (context, candidate.key, owner))

    def release_all(self, owner: str) -> None:
        self.db.execute("DELETE FROM claims WHERE owner=?", (owner,))

    def renew(self, owner: str, lease: float = CLAIM_LEASE) -> None:
        self.db.execute("UPDATE claims SET expires=? WHERE owner=?", (time.time() + lease, owner))

    def claims(self, context: str | None = None) -> list[tuple[str, str, str, float]]:
        sql, args = "SELECT context, candidate, owner, expires FROM claims", ()
        if context:
            sql, args = sql + " WHERE context=?", (context,)
        return list(self.db.execute(sql, args))

    def keep_claims(self, owner: str, lease: float = CLAIM_LEASE) -> threading.Event:
        """Renew ``owner``'s claims every ``lease``/4 s from a daemon thread (its own connection) until
        the returned event is set; when the process dies the renewals stop and the claims expire."""
        stop = threading.Event()

        def renew() -> None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                while not stop.wait(lease / 4):
                    try:
                        db.execute("UPDATE claims SET expires=? WHERE owner=?", (time.time() + lease, owner))
                    except sqlite3.Error:
                        pass  # busy for longer than the timeout: the next round renews
            finally:
                db.close()

        threading.Thread(target=renew, name="cullmt-claims", daemon=True).start()
        return stop

    def evaluations(self, context: str | None = None, run: str | None = None) -> Iterator[Evaluation]:
        sql, args = "SELECT * FROM evaluations WHERE 1=1", []
        if context:
            sql, args = sql + " AND context=?", args + [context]
        if run:
            sql, args = sql + " AND run=?", args + [run]
        for row in self.db.execute(sql + " ORDER BY created", args):
            yield self._from_row(row, cached=True)

    def count(self, context: str | None = None, run: str | None = None, strategy: str | None = None) -> int:
        """Rows (of a context, computed by a run, by a strategy: ``name`` and its stages ``name:...``)."""
        sql, args = "SELECT COUNT(*) FROM evaluations WHERE 1=1", []
        if context:
            sql, args = sql + " AND context=?", args + [context]
        if run:
            sql, args = sql + " AND run=?", args + [run]
        if strategy:
            sql, args = sql + " AND (strategy=? OR strategy LIKE ?)", args + [strategy, strategy + ":%"]
        return self.db.execute(sql, args).fetchone()[0]

    def _from_row(self, row, cached: bool) -> Evaluation:
        (ctx, key, units, _n, params, nbytes, score, metrics, sentences, seconds, strategy, run, actor,
         _created) = row
        where = f"row (context {ctx}, candidate {key}: {str(units)[:80]})"
        return Evaluation(Candidate.of(_json(units, self.path, where)), score, params, nbytes,
                          _json(metrics, self.path, where), sentences, seconds, strategy, run, actor, cached=cached)


def _dead_here(owner: str) -> bool:
    """A claim's owner (``host:pid:...``) is a process of this host that is gone: its claim is void now,
    not when its lease ends (a killed driver's own ``--resume`` need not wait for it)."""
    import os
    import socket

    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise StoreError(f"results store {path}: {where} holds broken JSON {str(text)[:40]!r}") from None
