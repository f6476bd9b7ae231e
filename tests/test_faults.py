"""Fault injection through the real command line: overlapping searches on one store, an evaluator actor
killed past its restarts, a killed comparison resumed. Each test runs ``cullmt-ray`` processes, each with
its own local Ray cluster (a killed search resumed: tests/test_cli.py)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

CLI = [sys.executable, "-m", "cullmt_ray.cli"]
ENV = {**os.environ, "CULLMT_NO_PROGRESS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def _args(model: Path, tmp: Path, name: str) -> list[str]:
    return ["--model", str(model), "--spm", "reference", "--directions", "en-de", "--max-sentences", "12",
            "--threshold", "100", "--target-removed", "2", "--actors", "1", "--set", "resources.num_cpus=1",
            "--store", str(tmp / "store.sqlite"), "--output", str(tmp / name), "--name", name]


def _rows(store: Path, where: str = "1=1", args: tuple = ()) -> int:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            return db.execute(f"SELECT COUNT(*) FROM evaluations WHERE {where}", args).fetchone()[0]
    except sqlite3.Error:
        return 0


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(CLI + args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run_json(folder: Path) -> tuple[Path, dict]:
    (run_dir,) = folder.iterdir()
    return run_dir, json.loads((run_dir / "run.json").read_text())


def test_overlapping_searches_never_compute_a_candidate_twice(tmp_path, tiny_encdec):
    """Two searches of the same setting started together on one store: every candidate is computed once,
    by one of them; the other reads it (or waits for it while the first computes it)."""
    procs = [_start(["search", *_args(tiny_encdec, tmp_path, name)], tmp_path) for name in ("a", "b")]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    infos = [_run_json(tmp_path / name)[1] for name in ("a", "b")]
    computed = sum(i["budget"]["evaluations"] for i in infos)
    rows = _rows(tmp_path / "store.sqlite")
    assert computed == rows, (computed, rows, [i["budget"] for i in infos])
    assert all(i["budget"]["evaluations"] + i["budget"]["cached"] >= rows for i in infos)  # each saw every one
    assert infos[0]["final"] == infos[1]["final"]
    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # every claim released


def _actor_pids(session: int) -> set[int]:
    """Evaluator actor processes started by the driver whose session is ``session`` (never anyone else's)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    pids = set()
    for line in out.splitlines():
        pid, sid, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (0, -1, "")
        if int(sid) == session and args.startswith("ray::EvaluatorActor"):
            pids.add(int(pid))
    return pids


def test_an_actor_killed_past_its_restarts_fails_the_run_with_a_hint_to_resume(tmp_path, tiny_encdec):
    proc = _start(["search", *_args(tiny_encdec, tmp_path, "k")], tmp_path)
    store = tmp_path / "store.sqlite"
    deadline = time.time() + 300
    while _rows(store) < 1 and proc.poll() is None and time.time() < deadline:  # the pool is up: baseline stored
        time.sleep(0.1)
    killed: set[int] = set()
    while proc.poll() is None and time.time() < deadline:
        for pid in _actor_pids(proc.pid) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(killed) >= 4, (proc.returncode, killed, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    run_dir, info = _run_json(tmp_path / "k")
    assert lines[0].startswith("cullmt-ray search: error: evaluator actor") and \
        f"cullmt-ray search --resume {run_dir}" in lines[0], lines[0]
    assert info["status"] == "failed" and "died" in info["error"]
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


def test_a_killed_compare_resumes_and_counts_every_attempt(tmp_path, tiny_encdec):
    args = ["compare", *_args(tiny_encdec, tmp_path, "c"), "--strategies", "greedy,random", "--budget", "6"]
    store = tmp_path / "store.sqlite"
    proc = _start(args, tmp_path)
    deadline = time.time() + 300
    while _rows(store) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    before = _rows(store)
    run_dir, info = _run_json(tmp_path / "c")
    assert before >= 5 and info["status"] == "running" and info["record"]["strategies"] == ["greedy", "random"]

    out = subprocess.run(CLI + ["compare", "--resume", str(run_dir)], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "left 'running' by a driver that is gone" in out.stdout
    assert [p.name for p in (tmp_path / "c").iterdir()] == [run_dir.name]  # no second folder
    info = json.loads((run_dir / "run.json").read_text())
    report = json.loads((run_dir / "compare.json").read_text())
    assert info["status"] == "finished" and info["attempt"] == 2 and info["resumed"] is True
    rows = _rows(store)
    assert info["evaluations_all_attempts"] == rows  # one run id across both attempts, nothing computed twice
    computed = {r["strategy"]: r["computed"] for r in report["strategies"]}
    this_attempt = sum(r["computed_this_attempt"] for r in report["strategies"])
    assert sum(computed.values()) + _rows(store, "strategy='baseline'") == rows
    assert this_attempt == rows - before  # the second attempt computed only what the first had not
    assert (run_dir / "compare.md").exists() and (run_dir / "fronts.png").exists()


def test_a_terminated_search_says_interrupted_and_resumes(tmp_path, tiny_encdec):
    """SIGTERM to the driver alone: run.json says interrupted (never running), no claim is left, and
    --resume finishes the run."""
    store = tmp_path / "store.sqlite"
    proc = _start(["search", *_args(tiny_encdec, tmp_path, "t")], tmp_path)
    deadline = time.time() + 300
    while _rows(store) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.strip() == "cullmt-ray search: interrupted", err[-2000:]
    run_dir, info = _run_json(tmp_path / "t")
    assert info["status"] == "interrupted" and "signal 15" in info["error"]
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    out = subprocess.run(CLI + ["search", "--resume", str(run_dir)], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["evaluations_all_attempts"] == _rows(store)
