"""Persistent results: every evaluation in one database, keyed by context and candidate.

The database is a SQLite file (WAL; the embedded default) or PostgreSQL (``postgresql://...``: a
store shared by a team, or by jobs on a cluster), with the same schema and the same claims
(:mod:`cullmt_ray.dburl` parses the location).

The *context* is everything that makes two evaluations comparable: model, dev set content,
directions, metric signatures, decoding settings and dtype. Within a context, a candidate is
evaluated once, ever: across strategies, runs and crashes. Each row is committed as soon as
its evaluation finishes, so a killed search loses at most the evaluations in flight.

Concurrent runs on one store never compute the same candidate: a driver *claims* each candidate
it computes (owner + lease in the ``claims`` table), others wait for that row instead of
recomputing it, and a dead owner's claim expires when its lease is not renewed. A claim is one
transaction that holds the claims table (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``LOCK TABLE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .candidate import Candidate, Evaluation
from .data import dumps_canonical
from .dburl import StoreError, StoreLocation, parse_store

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
PG_SCHEMA = SCHEMA.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")  # SQLite's are 64-bit
PG_SCHEMA_LOCK = 0x63756C6C  # advisory lock: drivers starting together create the tables once
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


def _create_file(path: Path) -> None:
    """Create a new store file whole: the schema is written to a temporary file beside it, which is then
    linked into place only if no file is there yet. Another process starting at the same moment sees
    either no file or a complete store, never the empty file SQLite makes before its first page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # kept in the file's header
            db.executescript(SCHEMA)
        finally:
            db.close()
        try:
            os.link(tmp, path)  # fails if another process made the store first: theirs is kept
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: moved into place unless one appeared meanwhile
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)


def context_key(description: dict) -> str:
    return hashlib.sha256(dumps_canonical(description).encode()).hexdigest()[:16]


class ResultStore:
    """The results store (SQLite file or PostgreSQL database); one connection per instance, safe for one
    writer per process (the driver), other processes and drivers with their own connections."""

    def __init__(self, location: str | Path, read_only: bool = False):
        self.location: StoreLocation = parse_store(location)
        self.name = self.location.shown  # in messages: the file, or the URL without its password
        self.path = self.location.path  # the SQLite file; None for PostgreSQL
        self.pg = self.location.kind == "postgresql"
        self._optuna = None  # Optuna's storage in this database, made on first use
        if self.pg:
            self.db = self._connect_pg(read_only)
            return
        if read_only and not self.path.exists():
            raise StoreError(f"results store {str(location)!r} does not exist")
        try:
            if not self.path.exists():
                _create_file(self.path)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"results store {str(location)!r}: cannot create it ({e})") from None
        _check_file(self.path)
        try:
            if read_only:
                self.db = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, timeout=30,
                                          isolation_level=None)
            else:
                self.db = self._connect()
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"results store {str(location)!r}: cannot open it ({e})") from None

    def _connect(self, read_only: bool = False):
        """A new connection in autocommit mode (the claim keeper's thread opens its own)."""
        if not self.pg:
            return sqlite3.connect(self.path, timeout=30, isolation_level=None)
        import psycopg

        opts = {"options": "-c default_transaction_read_only=on"} if read_only else {}
        return psycopg.connect(self.location.conninfo, autocommit=True, connect_timeout=10, **opts)

    def _connect_pg(self, read_only: bool):
        """Connect, then create the tables (or, read-only, check that they are there)."""
        try:
            import psycopg
        except ImportError:
            raise StoreError(f"results store {self.name!r}: PostgreSQL needs the psycopg driver; "
                             "pip install 'cullmt-ray[postgres]'") from None
        try:
            db = self._connect(read_only)
        except psycopg.Error as e:
            why = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
            why = re.sub(r"^connection failed: (connection to server at .*?, port \d+ failed: )?", "", why)
            why = re.sub(r"FATAL:\s+", "", why)
            hint = ("; the password comes from the URL, PGPASSWORD or ~/.pgpass (a run folder keeps none)"
                    if "password" in why else "")
            raise StoreError(f"results store {self.name!r}: cannot connect ({why[:200]}){hint}; expected a "
                             "reachable PostgreSQL server, postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE") from None
        try:
            tables = {t for (t,) in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
            if tables and "evaluations" in tables and "contexts" not in tables:
                raise StoreError(f"results store {self.name!r}: its evaluations table is not a cullmt-ray store's")
            if read_only and not {"contexts", "evaluations"} <= tables:
                raise StoreError(f"results store {self.name!r} has no cullmt-ray tables; expected a database "
                                 "some cullmt-ray run has written")
            if not read_only:
                with db.transaction():
                    db.execute(f"SELECT pg_advisory_xact_lock({PG_SCHEMA_LOCK})")
                    db.execute(PG_SCHEMA)
        except BaseException as e:
            db.close()
            if isinstance(e, psycopg.Error):
                raise StoreError(f"results store {self.name!r}: cannot use it ({str(e).strip()[:200]})") from None
            raise
        return db

    def _sql(self, db, sql: str, args=()):
        """Run one statement (``?`` placeholders, as SQLite writes them) on ``db``."""
        return db.execute(sql.replace("?", "%s") if self.pg else sql, args)

    def _x(self, sql: str, args=()):
        return self._sql(self.db, sql, args)

    @contextmanager
    def _claims_locked(self) -> Iterator[None]:
        """One transaction that holds the claims table against other writers until it ends."""
        if self.pg:
            with self.db.transaction():
                self.db.execute("LOCK TABLE claims IN SHARE ROW EXCLUSIVE MODE")
                yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """The driver's database errors."""
        if self.pg:
            import psycopg

            return (psycopg.Error,)
        return (sqlite3.Error,)

    def optuna_storage(self):
        """Optuna's RDB storage in this database (PostgreSQL; made once, its tables created under the
        schema lock so that drivers starting together do not race); None for SQLite (studies stay in memory)."""
        if not self.pg:
            return None
        if self._optuna is None:
            import optuna

            with self.db.transaction():
                self.db.execute(f"SELECT pg_advisory_xact_lock({PG_SCHEMA_LOCK})")
                self._optuna = optuna.storages.RDBStorage(self.location.sqlalchemy_url,
                                                          engine_kwargs={"pool_pre_ping": True})
        return self._optuna

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._optuna is not None:
            self._optuna.engine.dispose()
        self.db.close()

    def register_context(self, description: dict) -> str:
        key = context_key(description)
        self._x("INSERT INTO contexts VALUES (?, ?) ON CONFLICT DO NOTHING", (key, dumps_canonical(description)))
        return key

    def context_description(self, context: str) -> dict:
        row = self._x("SELECT description FROM contexts WHERE context=?", (context,)).fetchone()
        if row is None:
            raise KeyError(f"context {context} is not in {self.name}")
        return _json(row[0], self.name, f"context {context}")

    def contexts(self) -> list[str]:
        order = "(SELECT MIN(created) FROM evaluations e WHERE e.context = contexts.context), context" \
            if self.pg else "rowid"  # PostgreSQL has no rowid: in the order of their first evaluation
        return [c for (c,) in self._x(f"SELECT context FROM contexts ORDER BY {order}")]

    def get(self, context: str, candidate: Candidate) -> Evaluation | None:
        row = self._x("SELECT * FROM evaluations WHERE context=? AND candidate=?", (context, candidate.key)).fetchone()
        return self._from_row(row, cached=True) if row else None

    def put(self, context: str, ev: Evaluation) -> None:
        """Insert atomically; a candidate already stored keeps its first evaluation."""
        r = ev.as_row()
        self._x(
            "INSERT INTO evaluations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (context, r["candidate"], json.dumps(r["units"]), r["n_removed"], r["params"], r["bytes"],
             r["score"], json.dumps(r["metrics"]), r["sentences"], r["seconds"], r["strategy"], r["run"],
             r["actor"], time.time()))
        self._x("DELETE FROM claims WHERE context=? AND candidate=?", (context, r["candidate"]))

    # ------------------------------------------------------------------ claims (concurrent runs)
    def claim(self, context: str, candidate: Candidate, owner: str, lease: float = CLAIM_LEASE) -> str:
        """Try to take ``candidate`` for computing: ``'stored'`` (its row exists), ``'mine'`` (claimed now,
        or already ours) or ``'taken'`` (another owner's claim that has not expired)."""
        now = time.time()
        with self._claims_locked():
            if self._x("SELECT 1 FROM evaluations WHERE context=? AND candidate=?", (context, candidate.key)).fetchone():
                return "stored"
            row = self._x("SELECT owner, expires FROM claims WHERE context=? AND candidate=?",
                          (context, candidate.key)).fetchone()
            if row is not None and row[0] != owner and row[1] > now and not _dead_here(row[0]):
                return "taken"
            self._x("INSERT INTO claims VALUES (?,?,?,?) ON CONFLICT (context, candidate) DO UPDATE "
                    "SET owner=excluded.owner, expires=excluded.expires", (context, candidate.key, owner, now + lease))
            return "mine"

    def release(self, context: str, candidate: Candidate, owner: str) -> None:
        self._x("DELETE FROM claims WHERE context=? AND candidate=? AND owner=?", (context, candidate.key, owner))

    def release_all(self, owner: str) -> None:
        self._x("DELETE FROM claims WHERE owner=?", (owner,))

    def renew(self, owner: str, lease: float = CLAIM_LEASE) -> None:
        self._x("UPDATE claims SET expires=? WHERE owner=?", (time.time() + lease, owner))

    def claims(self, context: str | None = None) -> list[tuple[str, str, str, float]]:
        sql, args = "SELECT context, candidate, owner, expires FROM claims", ()
        if context:
            sql, args = sql + " WHERE context=?", (context,)
        return [tuple(r) for r in self._x(sql, args)]

    def keep_claims(self, owner: str, lease: float = CLAIM_LEASE) -> threading.Event:
        """Renew ``owner``'s claims every ``lease``/4 s from a daemon thread (its own connection) until
        the returned event is set; when the process dies the renewals stop and the claims expire."""
        stop = threading.Event()
        errors = self.errors

        def renew() -> None:
            db = None
            try:
                while not stop.wait(lease / 4):
                    try:
                        db = db or self._connect()
                        self._sql(db, "UPDATE claims SET expires=? WHERE owner=?", (time.time() + lease, owner))
                    except errors:  # busy for longer than the timeout, or the server away: the next round renews
                        if db is not None and self.pg and db.closed:
                            db = None
            finally:
                if db is not None:
                    db.close()

        threading.Thread(target=renew, name="cullmt-claims", daemon=True).start()
        return stop

    def evaluations(self, context: str | None = None, run: str | None = None) -> Iterator[Evaluation]:
        sql, args = "SELECT * FROM evaluations WHERE 1=1", []
        if context:
            sql, args = sql + " AND context=?", args + [context]
        if run:
            sql, args = sql + " AND run=?", args + [run]
        for row in self._x(sql + " ORDER BY created", args).fetchall():
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
        return self._x(sql, args).fetchone()[0]

    def _from_row(self, row, cached: bool) -> Evaluation:
        (ctx, key, units, _n, params, nbytes, score, metrics, sentences, seconds, strategy, run, actor,
         _created) = row
        where = f"row (context {ctx}, candidate {key}: {str(units)[:80]})"
        return Evaluation(Candidate.of(_json(units, self.name, where)), score, params, nbytes,
                          _json(metrics, self.name, where), sentences, seconds, strategy, run, actor, cached=cached)


def _dead_here(owner: str) -> bool:
    """A claim's owner (``host:pid:...``) is a process of this host that is gone: its claim is void now,
    not when its lease ends (a killed driver's own ``--resume`` need not wait for it)."""
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


def _json(text: str, name: str, where: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise StoreError(f"results store {name}: {where} holds broken JSON {str(text)[:40]!r}") from None
