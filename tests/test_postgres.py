"""A results store in PostgreSQL: store URLs and masked passwords, claims under concurrency, Optuna studies
in the store's database, and two ``cullmt-ray search`` processes sharing one PostgreSQL store (one killed
and resumed). The server is a real one (tests/conftest.py ``postgres_server``); without it these skip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cullmt_ray.candidate import BASELINE, Candidate, Evaluation
from cullmt_ray.config import ConfigError, SearchConfig, load_config
from cullmt_ray.dburl import StoreError, mask, parse_store
from cullmt_ray.store import ResultStore

from tests.conftest import PG_PASSWORD, REPO, new_database

CLI = [sys.executable, "-m", "cullmt_ray.cli"]
ENV = {**os.environ, "CULLMT_NO_PROGRESS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
ENV.pop("PGPASSWORD", None)


# ----------------------------------------------------------------------------- locations (no server)
def test_store_locations_and_masked_passwords(tmp_path):
    assert parse_store("results/store.sqlite").path == Path("results/store.sqlite")
    assert parse_store("sqlite:////abs/s.sqlite").path == Path("/abs/s.sqlite")
    assert parse_store("sqlite:///rel/s.sqlite").path == Path("rel/s.sqlite")
    pg = parse_store("postgresql://team:pw@db.example:5433/cullmt")
    assert pg.kind == "postgresql" and pg.shown == "postgresql://team:***@db.example:5433/cullmt"
    assert pg.sqlalchemy_url == "postgresql+psycopg://team:pw@db.example:5433/cullmt"
    masked = parse_store(pg.shown)  # as a resumed run reads it from config.yaml: libpq gets no password
    assert masked.conninfo == "postgresql://team@db.example:5433/cullmt"
    assert parse_store("postgres://h/db?user=u&password=***").conninfo == "postgres://h/db?user=u"
    assert mask("postgres://h/db?user=u&password=pw&sslmode=require") == \
        "postgres://h/db?user=u&password=***&sslmode=require"
    for bad, says in [("mysql://u:pw@h/db", "unknown database scheme 'mysql'"), ("postgresql:///db", "no host"),
                      ("postgresql://h:port/db", "not a valid URL"), ("sqlite://x", "sqlite:///relative/path")]:
        with pytest.raises(StoreError) as e:
            parse_store(bad)
        assert says in str(e.value) and "pw" not in str(e.value).replace("password", ""), str(e.value)
    with pytest.raises(ConfigError, match=r"output.store: results store 'mysql://u:\*\*\*@h/db'"):
        load_config(None, ["output.store=mysql://u:pw@h/db"])
    cfg = load_config(None, ["output.store=postgresql://team:pw@db/cullmt"])
    assert cfg.output.store.endswith(":pw@db/cullmt")  # the run itself connects with it
    assert cfg.to_dict()["output"]["store"] == "postgresql://team:***@db/cullmt"  # config.yaml and run.json


def test_an_unreachable_server_is_one_line_naming_it():
    with pytest.raises(StoreError) as e:
        ResultStore("postgresql://u:pw@127.0.0.1:1/db")  # port 1: nothing listens
    msg = str(e.value)
    assert msg.startswith("results store 'postgresql://u:***@127.0.0.1:1/db': ") and "\n" not in msg, msg
    assert "cannot connect" in msg or "psycopg" in msg


# ----------------------------------------------------------------------------- with a server
def test_password_kept_out_of_the_location_comes_from_pgpassword(postgres_server, monkeypatch):
    url = new_database(postgres_server)
    masked = mask(url)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    with pytest.raises(StoreError, match="the password comes from the URL, PGPASSWORD or ~/.pgpass") as e:
        ResultStore(masked)
    assert PG_PASSWORD not in str(e.value)
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)
    with ResultStore(masked) as s:
        assert s.count() == 0
    with pytest.raises(StoreError, match="has no cullmt-ray tables"):
        ResultStore(new_database(postgres_server), read_only=True)


def test_concurrent_claims_give_each_candidate_one_owner(store_url):
    """Four drivers (own connections, own threads) claim the same 40 candidates at once: each has one owner."""
    ResultStore(store_url).close()  # the tables exist before the drivers start
    cands = [Candidate.of([f"enc.{i}", f"dec.{j}"]) for i in range(8) for j in range(5)]
    won: dict[str, list[Candidate]] = {}

    def driver(owner: str) -> None:
        with ResultStore(store_url) as s:
            ctx = s.register_context({"m": 1})
            won[owner] = [c for c in cands if s.claim(ctx, c, owner) == "mine"]

    threads = [threading.Thread(target=driver, args=(f"d{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mine = [c for w in won.values() for c in w]
    assert sorted(c.key for c in mine) == sorted(c.key for c in cands), {k: len(v) for k, v in won.items()}


def _score(c: Candidate) -> float:
    return 30.0 - sum((int(u.split(".")[1]) + 1) * (2 if u.startswith("dec") else 1) for u in c.units) / 3


def _drive(strategy) -> list[list[str]]:
    asked = []
    while batch := strategy.ask():
        asked += [c.units for c in batch]
        strategy.tell([Evaluation(c, _score(c), 1000 - 100 * len(c), 4000, {}, 4, 0.01) for c in batch])
    return asked


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_optuna_studies_live_in_the_store_database(postgres_server, name):
    """A study kept in PostgreSQL asks exactly what the in-memory one asks; optuna-dashboard (any Optuna
    client) sees it under RUN:STRATEGY; the same name again (a resumed run) starts the study over."""
    import optuna

    from cullmt_ray.strategies import make_strategy

    units = [f"enc.{i}" for i in range(4)] + [f"dec.{i}" for i in range(4)]
    base = Evaluation(BASELINE, 30.0, 1000, 4000, {}, 4, 0.01)
    search = SearchConfig(strategy=name, target_removed=2, max_evaluations=6, seed=3)
    memory = make_strategy(search, units, base, batch=4)
    in_memory = _drive(memory)
    with ResultStore(new_database(postgres_server)) as store:
        killed = make_strategy(search, units, base, batch=4)  # a first attempt, killed after one batch
        killed.keep_study(store.optuna_storage(), f"run-x:{name}")
        killed.ask()
        resumed = make_strategy(search, units, base, batch=4)
        resumed.keep_study(store.optuna_storage(), f"run-x:{name}")
        assert _drive(resumed) == in_memory
        study = optuna.load_study(study_name=f"run-x:{name}", storage=store.location.sqlalchemy_url)
        assert len(study.trials) == len(memory.study.trials) > 0  # the resumed attempt replaced the killed one
        assert [t.values for t in study.trials] == [t.values for t in memory.study.trials]
        assert optuna.get_all_study_names(store.location.sqlalchemy_url) == [f"run-x:{name}"]
        assert store.count() == 0 and store.contexts() == []  # Optuna's tables sit beside the store's


# ----------------------------------------------------------------------------- two searches, one store
def _pg_rows(url: str, where: str = "TRUE", args: tuple = ()) -> int:
    import psycopg

    with psycopg.connect(url) as db:
        return db.execute(f"SELECT COUNT(*) FROM evaluations WHERE {where}", args).fetchone()[0]


def _args(model: Path, tmp: Path, name: str, url: str) -> list[str]:
    return ["search", "--model", str(model), "--spm", "reference", "--directions", "en-de", "--max-sentences", "8",
            "--strategy", "tpe", "--target-removed", "2", "--max-evaluations", "15", "--threshold", "100",
            "--actors", "1", "--set", "resources.num_cpus=1", "--store", url, "--output", str(tmp / name),
            "--name", name]


def _run_dir(folder: Path, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list(folder.iterdir()) if folder.exists() else []
        if runs and (runs[0] / "run.json").exists():
            return runs[0]
        time.sleep(0.1)
    raise AssertionError(f"no run folder under {folder}")


def test_two_searches_share_a_postgres_store_and_a_killed_one_resumes(postgres_server, tiny_encdec, tmp_path):
    """Two TPE searches of one setting on one PostgreSQL store: B is killed (SIGKILL) once it has stored an
    evaluation, then A starts and B is resumed at once, so A and the resumed B run together on the store. (Started
    together, A could claim every candidate before B stored one: B then only reads and ends before the kill.) No
    candidate is computed twice, no claim is left, each run's study is in the database, and no file of either
    run holds the password."""
    import optuna
    import psycopg

    url = new_database(postgres_server)
    start = lambda args, env=ENV: subprocess.Popen(CLI + args, cwd=tmp_path, env=env, text=True,  # noqa: E731
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   start_new_session=True)
    b = start(_args(tiny_encdec, tmp_path, "b", url))
    procs = [b]
    try:
        run_b = _run_dir(tmp_path / "b")
        deadline = time.time() + 300
        while b.poll() is None and time.time() < deadline and _pg_rows(url, "run=%s", (run_b.name,)) < 1:
            time.sleep(0.05)
        assert b.poll() is None, "B ended before it could be killed"
        os.killpg(b.pid, signal.SIGKILL)
        b.communicate()
        killed_at = _pg_rows(url, "run=%s", (run_b.name,))
        assert json.loads((run_b / "run.json").read_text())["status"] == "running"  # killed: nothing wrote more
        a = start(_args(tiny_encdec, tmp_path, "a", url))
        resumed = start(["search", "--resume", str(run_b)], {**ENV, "PGPASSWORD": PG_PASSWORD})  # no password saved
        procs += [a, resumed]
        for p in (a, resumed):
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    run_a = _run_dir(tmp_path / "a")
    info_a, info_b = (json.loads((r / "run.json").read_text()) for r in (run_a, run_b))
    assert info_a["status"] == info_b["status"] == "finished" and info_b["attempt"] == 2
    rows = _pg_rows(url)
    by_a, by_b = _pg_rows(url, "run=%s", (run_a.name,)), _pg_rows(url, "run=%s", (run_b.name,))
    assert info_a["budget"]["evaluations"] == by_a and info_b["evaluations_all_attempts"] == by_b >= killed_at >= 1
    assert by_a + by_b == rows, (by_a, by_b, rows)  # every row computed once, by one of them
    assert info_a["budget"]["cached"] >= 1  # A read what B computed (at least B's first row) instead of computing it
    with psycopg.connect(url) as db:
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    studies = optuna.get_all_study_names(parse_store(url).sqlalchemy_url)
    assert sorted(studies) == sorted([f"{run_a.name}:tpe", f"{run_b.name}:tpe"])
    for f in [*run_a.rglob("*"), *run_b.rglob("*")]:
        if f.is_file():
            assert PG_PASSWORD.encode() not in f.read_bytes(), f
    assert info_b["config_snapshot"]["output"]["store"] == mask(url)
    print(f"\nA computed {by_a} (read {info_a['budget']['cached']}); B computed {by_b} in two attempts ({killed_at} "
          f"before SIGKILL; resumed: computed {info_b['budget']['evaluations']}, read {info_b['budget']['cached']}); "
          f"{rows} rows")
