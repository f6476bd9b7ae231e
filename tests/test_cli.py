"""The cullmt-ray command as a user runs it: help, bad input, and resuming a killed search."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cullmt_ray.cli"]


def run(args, **kw):
    env = {**os.environ, "CULLMT_NO_PROGRESS": "1", **kw.pop("env", {})}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=600, **kw)


def test_help_explains_the_commands():
    out = run(["--help"])
    assert out.returncode == 0
    for word in ("search", "evaluate", "pareto", "embedded default"):
        assert word in out.stdout
    assert run(["search", "--help"]).returncode == 0


BAD_INPUT = [
    (["search", "nope.yaml"], "config 'nope.yaml' does not exist"),
    (["search", "--set", "search.treshold=1"], "search.treshold: unknown field"),
    (["search", "--threshold", "-1"], "search.threshold=-1.0: expected >= 0"),
    (["search", "--set", "data.max_sentences=many"], "data.max_sentences='many': expected an integer"),
    (["search", "--dev", "/no/such/dev"], "dev set '/no/such/dev' does not exist"),
    (["search", "--languages", "en,xx"], "unknown language code 'xx'"),
    (["search", "--model", "/no/such/model"], "model '/no/such/model': no such model folder"),
    (["search", "--spm", "/no/such.model"], "no such SentencePiece model file"),
    (["search", "--metric", "ter"], "metric.primary='ter'"),
    (["evaluate", "--directions", "en-xx"], "unknown language code 'xx'"),
]


@pytest.fixture(scope="module")
def bad_input_outcomes(tmp_path_factory, tiny_encdec) -> list[tuple[Path, dict]]:
    """Each BAD_INPUT case run as the CLI runs it (forked from one process that imported it: tests/cli_forkrun.py),
    in its own working directory."""
    from tests.cli_forkrun import run_cases

    cases, dirs = [], []
    for args, _ in BAD_INPUT:
        cwd = tmp_path_factory.mktemp("bad")
        model = [] if "--model" in args else ["--model", str(tiny_encdec)]
        model += [] if "--spm" in args or "--model" in args else ["--spm", "reference"]
        cases.append({"argv": args + model + ["--store", str(cwd / "s.sqlite")], "cwd": str(cwd)})
        dirs.append(cwd)
    return list(zip(dirs, run_cases(cases)))


@pytest.mark.parametrize("i", range(len(BAD_INPUT)), ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line(i, bad_input_outcomes):
    message = BAD_INPUT[i][1]
    cwd, out = bad_input_outcomes[i]
    assert out["code"] == 2, out["stderr"][-2000:]
    err = out["stderr"].strip().splitlines()
    assert err[-1].startswith("cullmt-ray") and message in err[-1], out["stderr"]
    assert not (cwd / "results").exists() or not any((cwd / "results").rglob("pareto.csv"))


def test_flores200_missing_names_the_fix(tmp_path, tiny_encdec):
    out = run(["search", "--model", str(tiny_encdec), "--store", str(tmp_path / "s.sqlite")], cwd=tmp_path,
              env={"SACREBLEU": str(tmp_path / "empty")})
    assert out.returncode == 2 and "flores200 SentencePiece model, not found" in out.stderr


def test_evaluate_rejects_unknown_unit(tmp_path, tiny_encdec):
    out = run(["evaluate", "--model", str(tiny_encdec), "--spm", "reference", "--max-sentences", "4",
               "--remove", "enc.7", "--store", str(tmp_path / "s.sqlite")], cwd=tmp_path)
    assert out.returncode == 2 and "'enc.7' is not a unit" in out.stderr.strip().splitlines()[-1]


def _count(store) -> int:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:  # never creates the file
            return db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_search_resumes_without_reevaluating(tmp_path, tiny_encdec):
    common = ["--model", str(tiny_encdec), "--spm", "reference", "--directions", "en-de", "--max-sentences", "40",
              "--threshold", "100", "--set", "resources.num_cpus=2", "--name", "resume"]
    store = tmp_path / "s.sqlite"
    proc = subprocess.Popen(CLI + ["search", *common, "--store", str(store), "--output", str(tmp_path / "runs")],
                            cwd=tmp_path, env={**os.environ, "CULLMT_NO_PROGRESS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while _count(store) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    before = _count(store)
    assert before >= 6 and proc.returncode != 0, "the search must be killed midway"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    out = run(["search", "--resume", str(run_dir)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "left 'running' by a driver that is gone" in out.stdout  # the stale status is named
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed"] is True and info["attempt"] == 2
    assert info["evaluations_all_attempts"] == _count(store)  # both attempts, one run id
    # everything stored before the kill was read back; only the rest was computed
    assert info["budget"]["cached"] == before and info["budget"]["evaluations"] >= 1
    assert _count(store) == before + info["budget"]["evaluations"]
    assert (run_dir / "pareto.csv").exists() and (run_dir / "pareto.png").exists()

    # the resumed run ends where an uninterrupted one ends
    fresh = run(["search", *common, "--store", str(tmp_path / "fresh.sqlite"), "--output", str(tmp_path / "f")],
                cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    (fresh_dir,) = (tmp_path / "f").iterdir()
    assert json.loads((fresh_dir / "trace.json").read_text())["final"] == \
        json.loads((run_dir / "trace.json").read_text())["final"]
    assert json.loads((fresh_dir / "run.json").read_text())["budget"]["evaluations"] == _count(store)
