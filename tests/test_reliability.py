"""Nothing half-written, nothing lost, nothing computed twice: store claims for concurrent runs, corrupt
stores, files that honour the umask, exports at the base dtype, no pickled code loaded."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from cullmt_ray.candidate import BASELINE, Candidate, Evaluation
from cullmt_ray.store import ResultStore, StoreError

from tests.conftest import REPO


def ev(units, score=10.0, run="r"):
    return Evaluation(Candidate.of(units), score, 100, 400, {"bleu": {"mean": score}}, 8, 0.1, "greedy", run, "a")


# ----------------------------------------------------------------------------- claims
def test_claims_keep_a_candidate_with_one_owner_until_stored_or_expired(store_url):
    a, b = ResultStore(store_url), ResultStore(store_url)  # two drivers, two connections
    ctx = a.register_context({"m": 1})
    c = Candidate.of(["enc.1"])
    assert a.claim(ctx, c, "A") == "mine"
    assert a.claim(ctx, c, "A") == "mine"  # already ours
    assert b.claim(ctx, c, "B") == "taken"
    a.put(ctx, ev(["enc.1"]))  # storing the row ends the claim
    assert b.claims(ctx) == [] and b.claim(ctx, c, "B") == "stored"
    d = Candidate.of(["enc.2"])
    assert a.claim(ctx, d, "A", lease=0.2) == "mine"
    assert b.claim(ctx, d, "B") == "taken"
    time.sleep(0.3)  # A died: nobody renewed its lease
    assert b.claim(ctx, d, "B") == "mine"
    b.release_all("B")
    assert a.claims() == []


def test_a_live_owner_keeps_renewing_its_claims(store_url):
    a, b = ResultStore(store_url), ResultStore(store_url)
    ctx = a.register_context({"m": 1})
    c = Candidate.of(["enc.1"])
    assert a.claim(ctx, c, "A", lease=0.4) == "mine"
    stop = a.keep_claims("A", lease=0.4)
    try:
        time.sleep(1.0)  # longer than the lease: renewed meanwhile
        assert b.claim(ctx, c, "B") == "taken"
    finally:
        stop.set()
    time.sleep(0.6)
    assert b.claim(ctx, c, "B") == "mine"


def test_a_claim_of_a_dead_process_on_this_host_is_void_at_once(store_url):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    s = ResultStore(store_url)
    ctx = s.register_context({"m": 1})
    c = Candidate.of(["enc.1"])
    assert s.claim(ctx, c, f"{socket.gethostname()}:{dead}:run:x") == "mine"
    assert s.claim(ctx, c, f"{socket.gethostname()}:{os.getpid()}:run:y") == "mine"  # its owner is gone
    assert s.claim(ctx, c, f"other-host:{dead}:run:z") == "taken"  # elsewhere: only the lease tells


def test_old_stores_get_the_claims_table(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # a store from before claims existed
        db.executescript("CREATE TABLE contexts (context TEXT PRIMARY KEY, description TEXT NOT NULL);"
                         "CREATE TABLE evaluations (context TEXT, candidate TEXT, units TEXT, n_removed INTEGER,"
                         " params INTEGER, bytes INTEGER, score REAL, metrics TEXT, sentences INTEGER, seconds REAL,"
                         " strategy TEXT, run TEXT, actor TEXT, created REAL, PRIMARY KEY (context, candidate));")
    with ResultStore(path) as s:
        assert s.claim(s.register_context({"m": 1}), BASELINE, "A") == "mine"


class FakePool:
    """Computes a candidate on the driver; counts what it computed."""

    exact_rows, size = False, 1  # whole candidates only (EvaluationService._decode)

    def __init__(self):
        self.computed = []

    def evaluate(self, jobs, limit=None, metric=None):
        for c, _dirs in jobs:
            self.computed.append(c)
            yield c, {"score": 1.0, "params": 10, "bytes": 40, "metrics": {"bleu": {"mean": 1.0}}, "sentences": 4,
                      "seconds": 0.01, "actor": "fake"}


def _service(path, run):
    from cullmt_ray.config import SearchRunConfig
    from cullmt_ray.evaluation import EvalSet, EvaluationService
    from cullmt_ray.metrics import METRICS

    store = ResultStore(path)
    es = EvalSet([("eng_Latn", "deu_Latn")], {"m": 1}, METRICS["bleu"])
    es.context = store.register_context(es.description)
    svc = EvaluationService(SearchRunConfig(), FakePool(), store, None, run, poll_seconds=0.05)
    return svc, es


def test_a_candidate_another_run_computes_is_waited_for_not_recomputed(store_url):
    os.environ["CULLMT_NO_PROGRESS"] = "1"
    path = store_url
    other, es = _service(path, "other")
    mine, _ = _service(path, "mine")
    busy = Candidate.of(["enc.1"])
    assert other.store.claim(es.context, busy, other.owner) == "mine"
    threading.Timer(0.5, lambda: ResultStore(path).put(es.context, ev(["enc.1"], 7.0, "other"))).start()
    out = mine.evaluate([busy, Candidate.of(["enc.2"])], "greedy", es)
    assert mine.pool.computed == [Candidate.of(["enc.2"])]  # enc.1 came from the other run's row
    assert out[0].score == 7.0 and out[0].cached and mine.budget.evaluated == 1 and mine.budget.cached == 1
    mine.close()
    assert mine.store.claims() == []


def test_a_dead_runs_claim_expires_and_is_taken_over(store_url):
    os.environ["CULLMT_NO_PROGRESS"] = "1"
    path = store_url
    mine, es = _service(path, "mine")
    c = Candidate.of(["enc.1"])
    assert ResultStore(path).claim(es.context, c, "dead-driver", lease=0.3) == "mine"
    (got,) = mine.evaluate([c], "greedy", es)
    assert mine.pool.computed == [c] and not got.cached and mine.store.count(es.context) == 1


# ----------------------------------------------------------------------------- corrupt stores
@pytest.mark.parametrize("content,message", [
    (b"", "is an empty file (0 bytes)"),
    (b"hello, not a database\n", "is not a SQLite database"),
    (b"SQLite format 3\x00" + b"\xff" * 200, "unreadable SQLite database"),
])
def test_corrupt_stores_are_refused_and_left_alone(tmp_path, content, message):
    path = tmp_path / "s.sqlite"
    path.write_bytes(content)
    for read_only in (False, True):
        with pytest.raises(StoreError, match=re.escape(message)):
            ResultStore(path, read_only=read_only)
    assert path.read_bytes() == content


def _open_store(path: Path, results) -> None:
    try:
        with ResultStore(path):
            results.put("ok")
    except Exception as e:  # noqa: BLE001 - the test reports what each process saw
        results.put(repr(e))


def test_processes_opening_a_new_store_together_all_get_it(tmp_path):
    """Drivers started together on a store that does not exist yet: each opens the one complete store,
    none sees the empty file SQLite makes before its first page (it was refused as 'an empty file')."""
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    for i in range(8):
        path = tmp_path / f"s{i}.sqlite"
        results = mp.Queue()
        procs = [mp.Process(target=_open_store, args=(path, results)) for _ in range(6)]
        for p in procs:
            p.start()
        seen = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert seen == ["ok"] * 6, seen
    with ResultStore(tmp_path / "s0.sqlite", read_only=True) as s:
        assert s.count() == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_broken_row_names_store_and_row(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as s:
        ctx = s.register_context({"m": 1})
        s.put(ctx, ev(["enc.1"]))
        s.db.execute("UPDATE evaluations SET metrics='{broken'")
    with ResultStore(path, read_only=True) as s, pytest.raises(StoreError) as e:
        list(s.evaluations(ctx))
    assert str(path) in str(e.value) and '"enc.1"' in str(e.value) and "broken JSON" in str(e.value)


def test_read_only_open_never_writes(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as s:
        s.put(s.register_context({"m": 1}), ev(["enc.1"]))
    before = path.read_bytes()
    with ResultStore(path, read_only=True) as s:
        assert s.count() == 1
        with pytest.raises(sqlite3.OperationalError):
            s.put(s.contexts()[0], ev(["enc.2"]))
    assert path.read_bytes() == before
    with pytest.raises(StoreError, match="does not exist"):
        ResultStore(tmp_path / "none.sqlite", read_only=True)
    assert not (tmp_path / "none.sqlite").exists()


# ----------------------------------------------------------------------------- files
def test_files_honour_the_umask(tmp_path):
    from cullmt_ray.atomic import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


def test_no_pickle_loads_anywhere():
    """``torch.load`` only with ``weights_only=True``: a planted checkpoint cannot run code."""
    offenders = []
    for f in list((REPO / "cullmt_ray").rglob("*.py")) + list((REPO / "recipes").rglob("*.py")):
        text = f.read_text()
        if "weights_only=False" in text or ("torch.load(" in text and "weights_only=True" not in text):
            offenders.append(str(f.relative_to(REPO)))
    assert not offenders


def test_export_keeps_the_base_dtype_and_writes_a_card(tmp_path):
    """reference:dense is stored in fp16 and loaded in fp32 on CPU: the export is fp16 again, with its card."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForSeq2SeqLM

    from cullmt_ray.config import ModelConfig
    from cullmt_ray.families import load_family, resolve_model_path

    fam = load_family(ModelConfig("reference:dense"))
    assert next(fam.model.parameters()).dtype.is_floating_point and str(fam.model.dtype) == "torch.float32"
    fam.translate(["A dog runs."], "ces_Latn", "eng_Latn")  # the tokenizer's src_lang is now ces_Latn
    old = os.umask(0o022)
    try:
        out = fam.export(["enc.1"], tmp_path / "pruned")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}  # safetensors' own 0600 undone
    base = Path(resolve_model_path("reference:dense")) / "model.safetensors"
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.97 * base.stat().st_size  # one layer fewer, at fp16 (an fp32 save would be ~1.9x)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    facts = json.loads((out / "cullmt_ray.json").read_text())
    assert facts["dtype"] == "float16" and facts["removed_units"] == ["enc.1"]
    card = (out / "README.md").read_text()
    assert "src_lang=ces_Latn" in card and "float16" in card
    model = AutoModelForSeq2SeqLM.from_pretrained(out)  # plain transformers
    assert model.config.encoder_layers == fam.model.config.encoder_layers - 1
    assert str(next(fam.model.parameters()).dtype) == "torch.float32"  # the in-memory model is untouched


# ----------------------------------------------------------------------------- resume checks
def test_resume_refuses_an_edited_config_unless_accepted(tmp_path, caplog):
    import json

    from cullmt_ray.config import ConfigError, load_config
    from cullmt_ray.session import check_resume

    cfg = load_config(None, [])
    snap = json.loads(json.dumps(cfg.to_dict()))
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed", "config_snapshot": snap}))
    assert check_resume(tmp_path, cfg)["status"] == "failed"  # unchanged: fine
    edited = load_config(None, ["search.threshold=5", "data.max_sentences=7"])
    with pytest.raises(ConfigError, match=r"edited since the run started \(data.max_sentences, search.threshold\)"):
        check_resume(tmp_path, edited)
    with caplog.at_level("WARNING", logger="cullmt_ray"):
        check_resume(tmp_path, edited, accept_config_changes=True)
    assert "resuming with an edited config" in caplog.text


def test_resume_of_a_run_whose_driver_is_gone_warns_and_goes_on(tmp_path, caplog):
    import json
    import subprocess
    import sys

    from cullmt_ray.config import load_config
    from cullmt_ray.session import check_resume

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "pid": gone}))
    with caplog.at_level("WARNING", logger="cullmt_ray"):
        check_resume(tmp_path, load_config(None, []))
    assert "left 'running' by a driver that is gone" in caplog.text
