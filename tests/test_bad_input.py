"""Bad input, as a hostile user gives it: every case ends with one line on stderr naming the bad value,
exit code 2, no traceback, no new folder, and the results store untouched.

Every case runs the real command line (``cullmt_ray.cli.main``) in its own process; to keep the matrix
fast the processes are forked from one that imported the CLI once (tests/cli_forkrun.py), and a few
cases also run as plain ``python -m cullmt_ray.cli`` processes to show both give the same answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_forkrun import run_cases
from tests.conftest import REPO

ENV = {**os.environ, "CULLMT_NO_PROGRESS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
       "PYTHONWARNINGS": "ignore"}

SEARCH_VERBS = ("search", "compare", "calibrate", "evaluate", "experts")


def base_args(verb: str, w: dict) -> dict:
    """The good arguments of a verb; a case overrides (or with None removes) some of them."""
    args = {"--model": w["model"], "--dev": w["dev"], "--languages": "eng_Latn,deu_Latn",
            "--directions": "eng_Latn-deu_Latn", "--spm": "reference", "--store": w["store"], "--max-sentences": "4"}
    if verb != "evaluate":
        args["--output"] = w["out"]
    return args


# (id, verb, {flag: value or None}, extra args, exit code, what the line must say); {name} = a world path
CASES = [
    # --- config values and flags
    ("threshold-nan", "search", {}, ["--threshold", "nan"], 2, "search.threshold='nan': expected a finite number"),
    ("threshold-inf", "search", {}, ["--threshold", "inf"], 2, "expected a finite number"),
    ("threshold-negative", "search", {}, ["--threshold", "-1"], 2, "search.threshold=-1.0: expected >= 0"),
    ("target-inf", "search", {}, ["--set", "search.target_removed=.inf"], 2, "search.target_removed=inf"),
    ("target-negative", "search", {}, ["--set", "search.target_removed=-2"], 2, "search.target_removed=-2"),
    ("target-text", "search", {}, ["--set", "search.target_removed=many"], 2, "search.target_removed='many'"),
    ("racing-maybe", "search", {}, ["--set", "search.racing=maybe"], 2,
     "search.racing='maybe': expected true, false or auto"),
    ("racing-hybrid", "search", {}, ["--strategy", "hybrid", "--set", "search.racing=true"], 2,
     "search.racing=true: races the steps of strategy greedy or beam"),
    ("max-sentences-zero", "search", {"--max-sentences": "0"}, [], 2, "data.max_sentences=0"),
    ("max-sentences-text", "search", {"--max-sentences": "many"}, [], 2, "data.max_sentences='many'"),
    ("max-sentences-nan", "search", {"--max-sentences": None}, ["--set", "data.max_sentences=.nan"], 2,
     "data.max_sentences"),
    ("unknown-field", "search", {}, ["--set", "search.treshold=1"], 2, "search.treshold: unknown field"),
    ("unknown-section", "search", {}, ["--set", "nosection.x=1"], 2, "nosection: unknown section"),
    ("set-without-value", "search", {}, ["--set", "search.threshold"], 2, "--set 'search.threshold'"),
    ("strategy-unknown", "search", {}, ["--strategy", "annealing"], 2, "search.strategy='annealing'"),
    ("metric-unknown", "search", {"--metric": "ter"}, [], 2, "metric.primary='ter'"),
    ("dtype-float8", "search", {}, ["--set", "model.dtype=float8"], 2, "model.dtype='float8'"),
    ("family-unknown", "search", {}, ["--set", "model.family=rnn"], 2, "model.family='rnn'"),
    ("beams-zero", "search", {}, ["--set", "decoding.num_beams=0"], 2, "decoding.num_beams=0"),
    ("actors-zero", "search", {"--actors": "0"}, [], 2, "resources.actors=0"),
    ("keep-two", "search", {}, ["--set", "search.fidelity.keep=2"], 2, "search.fidelity.keep=2"),
    ("params-fraction", "search", {}, ["--set", "search.target_params_fraction=1.5"], 2,
     "search.target_params_fraction=1.5"),
    ("max-evaluations-zero", "search", {}, ["--max-evaluations", "0"], 2, "search.max_evaluations=0"),
    ("option-unknown", "search", {}, ["--set", "search.options.beam.depth=3"], 2, "search.options.beam.depth"),
    ("name-with-slash", "search", {}, ["--name", "a/b"], 2, "name='a/b'"),
    ("tune-staged", "search", {}, ["--set", "search.driver=tune", "--set", "search.fidelity.sentences=2"], 2,
     "search.fidelity"),
    ("config-missing", "search", {}, ["{tmp}/nope.yaml"], 2, "nope.yaml' does not exist"),
    ("config-broken-yaml", "search", {}, ["{broken_yaml}"], 2, "not valid YAML"),
    ("config-a-list", "search", {}, ["{list_yaml}"], 2, "expected a mapping of sections"),
    # --- languages, directions, dev set
    ("language-unknown", "search", {"--languages": "en,xx"}, [], 2, "unknown language code 'xx'"),
    ("language-without-file", "search", {"--languages": "eng_Latn,fra_Latn"}, [], 2, "fra_Latn"),
    ("direction-unknown-language", "search", {"--directions": "en-xx"}, [], 2, "unknown language code 'xx'"),
    ("direction-not-configured", "search", {"--directions": "eng_Latn-fra_Latn"}, [], 2, "fra_Latn"),
    ("direction-same-language", "search", {"--directions": "eng_Latn-eng_Latn"}, [], 2, "same language"),
    ("direction-malformed", "search", {"--directions": "english"}, [], 2, "'english'"),
    ("dev-missing", "search", {"--dev": "/no/such/dev"}, [], 2, "dev set '/no/such/dev' does not exist"),
    ("dev-empty-folder", "search", {"--dev": "{dev_empty}"}, [], 2, "no language files found"),
    ("dev-mismatched", "search", {"--dev": "{dev_mismatched}"}, [], 2, "line counts differ"),
    ("dev-empty-file", "search", {"--dev": "{dev_emptyfile}"}, [], 2, "(deu_Latn=0, eng_Latn=8)"),
    ("dev-empty-line", "search", {"--dev": "{dev_emptyline}"}, [], 2, "line 3 is empty"),
    ("dev-not-utf8", "search", {"--dev": "{dev_latin1}"}, [], 2, "deu_Latn.txt: not UTF-8"),
    ("dev-bad-format", "search", {"--dev": "{file}"}, [], 2, "unknown format"),
    # --- model, SentencePiece model
    ("model-missing", "search", {"--model": "/no/such/model"}, [], 2, "model '/no/such/model': no such model folder"),
    ("model-no-config", "search", {"--model": "{model_noconfig}"}, [], 2, "no such model folder"),
    ("model-broken-config", "search", {"--model": "{model_badconfig}"}, [], 2, "model.name="),
    ("model-truncated-weights", "search", {"--model": "{model_truncated}"}, [], 2,
     "model.safetensors: not a valid safetensors file"),
    ("model-garbage-weights", "search", {"--model": "{model_garbage}"}, [], 2,
     "model.safetensors: not a valid safetensors file"),
    ("model-no-weights", "search", {"--model": "{model_noweights}"}, [], 2, "no weight file"),
    ("model-reference-unknown", "search", {"--model": "reference:huge"}, [], 2, "'reference:huge' is not shipped"),
    ("spm-missing", "search", {"--spm": "/no/such.model"}, [], 2, "no such SentencePiece model file"),
    # --- units and targets
    ("protect-not-a-unit", "search", {"--protect": "enc.9"}, [], 2, "'enc.9' is not a unit"),
    ("protect-malformed", "search", {"--protect": "encoder3"}, [], 2, "encoder3"),
    ("random-target-99", "search", {}, ["--strategy", "random", "--target-removed", "99"], 2,
     "search.target_removed=99"),
    ("tpe-no-target", "search", {}, ["--strategy", "tpe"], 2, "search.target_removed=None"),
    ("evolutionary-target-all", "search", {}, ["--strategy", "evolutionary", "--target-removed", "6"], 2,
     "search.target_removed=6"),
    # --- output folder and store
    ("output-proc", "search", {"--output": "/proc/x"}, [], 2, "output.dir='/proc/x'"),
    ("output-under-file", "search", {"--output": "{file}/runs"}, [], 2, "is a file, not a folder"),
    ("store-under-file", "search", {"--store": "{file}/store.sqlite"}, [], 2, "store.sqlite"),
    ("store-zero-bytes", "search", {"--store": "{store_empty}"}, [], 2, "is an empty file (0 bytes)"),
    ("store-text", "search", {"--store": "{file}"}, [], 2, "is not a SQLite database"),
    ("store-foreign", "search", {"--store": "{store_foreign}"}, [], 2, "a SQLite database of something else"),
    ("store-a-folder", "search", {"--store": "{dev}"}, [], 2, "is not a file"),
    ("store-unknown-scheme", "search", {"--store": "mysql://u:pw@host/db"}, [], 2,
     "results store 'mysql://u:***@host/db': unknown database scheme 'mysql'"),
    ("store-postgres-unreachable", "search", {"--store": "postgresql://u:pw@127.0.0.1:1/db"}, [], 2,
     "results store 'postgresql://u:***@127.0.0.1:1/db': "),
    ("pareto-postgres-unreachable", "pareto", None, ["postgresql://u:pw@127.0.0.1:1/db"], 2,
     "results store 'postgresql://u:***@127.0.0.1:1/db': "),
    # --- resume
    ("resume-not-a-run", "search", {}, ["--resume", "/not-a-run"], 2, "--resume /not-a-run: no config.yaml"),
    ("resume-broken-config", "search", {}, ["--resume", "{run_broken}"], 2, "not valid YAML"),
    ("resume-edited-config", "search", {}, ["--resume", "{run_edited}"], 2,
     "config.yaml was edited since the run started (search.threshold)"),
    ("resume-still-running", "search", {}, ["--resume", "{run_live}"], 2, "the run is still running"),
    # --- the other verbs
    ("evaluate-unit-unknown", "evaluate", {}, ["--remove", "enc.7"], 2, "'enc.7' is not a unit"),
    ("evaluate-unit-malformed", "evaluate", {}, ["--remove", "layer-1"], 2, "layer-1"),
    ("evaluate-json-under-file", "evaluate", {}, ["--json", "{file}/x.json"], 2, "--json="),
    ("evaluate-export-proc", "evaluate", {}, ["--export", "/proc/x"], 2, "--export='/proc/x'"),
    ("evaluate-dtype", "evaluate", {}, ["--set", "model.dtype=float8"], 2, "model.dtype='float8'"),
    ("compare-unknown-strategy", "compare", {}, ["--strategies", "greedy,nope"], 2, "--strategies: 'nope'"),
    ("compare-budget-zero", "compare", {}, ["--budget", "0"], 2, "--budget=0"),
    ("compare-random-target-99", "compare", {}, ["--strategies", "random", "--target-removed", "99"], 2,
     "search.target_removed=99"),
    ("compare-resume-not-compare", "compare", {}, ["--resume", "{run_edited}"], 2, "does not name the strategies"),
    ("calibrate-into-unknown", "calibrate", {}, ["--calibration", "into:xx"], 2, "calibration 'into:xx'"),
    ("calibrate-into-unconfigured", "calibrate", {}, ["--calibration", "into:fra_Latn"], 2, "into:fra_Latn"),
    ("calibrate-nonsense", "calibrate", {}, ["--calibration", "sideways"], 2, "calibration 'sideways'"),
    ("experts-dense-model", "experts", {}, [], 2, "expert"),
    ("experts-rate", "experts", {}, ["--rates", "1.5"], 2, "experts.rates: 1.5"),
    ("pareto-not-a-run", "pareto", None, ["/not-a-run"], 2, "pareto /not-a-run: no config.yaml"),
    ("pareto-text-file", "pareto", None, ["{file}"], 2, "is not a SQLite database"),
    ("pareto-empty-file", "pareto", None, ["{store_empty}"], 2, "is an empty file (0 bytes)"),
    ("pareto-foreign-db", "pareto", None, ["{store_foreign}"], 2, "a SQLite database of something else"),
    ("pareto-broken-config", "pareto", None, ["{run_broken}"], 2, "not valid YAML"),
    ("pareto-unfinished", "pareto", None, ["{run_edited}"], 2, "the run has not finished"),
    ("heal-no-run", "heal", None, [], 2, "expected a search run folder"),
    ("heal-not-a-run", "heal", None, ["/not-a-run"], 2, "/not-a-run"),
    ("heal-config-missing", "heal", None, ["{run_edited}", "--config", "/no/heal.yaml"], 2, "/no/heal.yaml"),
    ("heal-unknown-field", "heal", None, ["{run_edited}", "--set", "lora.rank=8"], 2, "lora.rank"),
    ("evaluate-store-foreign", "evaluate", {"--store": "{store_foreign}"}, [], 2, "a SQLite database of something else"),
    ("compare-resume-not-a-run", "compare", {}, ["--resume", "/not-a-run"], 2, "--resume /not-a-run: no config.yaml"),
    ("calibrate-protect", "calibrate", {"--protect": "dec.7"}, [], 2, "'dec.7' is not a unit"),
    ("heal-resume-not-a-heal", "heal", None, ["--resume", "/not-a-heal"], 2, "--resume /not-a-heal: no config.yaml"),
]
REAL_PROCESS = {"threshold-nan", "model-truncated-weights", "output-proc", "dev-not-utf8", "store-zero-bytes",
                "calibrate-into-unknown"}


def _rows(store: Path) -> int:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with a hash of its bytes (what must not change)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_encdec) -> dict:
    """One tiny model and dev set, a store with rows, and one broken thing per case."""
    import shutil

    from cullmt_ray.candidate import BASELINE, Candidate, Evaluation
    from cullmt_ray.data import load_devset
    from cullmt_ray.store import ResultStore

    t = tmp_path_factory.mktemp("bad")
    w = {"tmp": str(t), "model": str(tiny_encdec), "out": str(t / "runs"), "cwd": str(t / "cwd")}
    (t / "cwd").mkdir()
    lines = load_devset("builtin:demo").lines

    def dev(name: str, eng: list[str], deu: list[str], enc: str = "utf-8") -> str:
        d = t / name
        d.mkdir()
        (d / "eng_Latn.txt").write_text("\n".join(eng) + ("\n" if eng else ""), encoding="utf-8")
        (d / "deu_Latn.txt").write_bytes(("\n".join(deu) + ("\n" if deu else "")).encode(enc))
        return str(d)

    eng, deu = list(lines["eng_Latn"][:8]), list(lines["deu_Latn"][:8])
    w["dev"] = dev("dev", eng, deu)
    w["dev_mismatched"] = dev("dev_mismatched", eng, deu[:5])
    w["dev_emptyfile"] = dev("dev_emptyfile", eng, [])
    w["dev_emptyline"] = dev("dev_emptyline", eng, deu[:2] + [""] + deu[3:])
    w["dev_latin1"] = dev("dev_latin1", eng, [s + " Größe" for s in deu], enc="latin-1")
    (t / "dev_empty").mkdir()
    w["dev_empty"] = str(t / "dev_empty")

    def model(name: str, change) -> str:
        d = t / name
        shutil.copytree(tiny_encdec, d)
        change(d)
        return str(d)

    w["model_truncated"] = model("m_trunc", lambda d: os.truncate(d / "model.safetensors", 100_000))
    w["model_garbage"] = model("m_garbage", lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)))
    w["model_badconfig"] = model("m_badconf", lambda d: (d / "config.json").write_text("{not json"))
    w["model_noconfig"] = model("m_noconf", lambda d: (d / "config.json").unlink())
    w["model_noweights"] = model("m_noweights", lambda d: (d / "model.safetensors").unlink())

    w["store"] = str(t / "store.sqlite")
    with ResultStore(w["store"]) as s:
        ctx = s.register_context({"test": "rows that must stay"})
        for c in (BASELINE, Candidate.of(["enc.1"])):
            s.put(ctx, Evaluation(c, 50.0, 100, 400, {"spbleu": {"mean": 50.0}}, 8, 0.1, "test", "r0", "a0"))
    (t / "empty.sqlite").touch()
    w["store_empty"] = str(t / "empty.sqlite")
    foreign = t / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    w["store_foreign"] = str(foreign)
    (t / "plain.txt").write_text("not a store\n")
    w["file"] = str(t / "plain.txt")
    (t / "broken.yaml").write_text("search: [unclosed\n")
    w["broken_yaml"] = str(t / "broken.yaml")
    (t / "list.yaml").write_text("- a\n- b\n")
    w["list_yaml"] = str(t / "list.yaml")

    # run folders (outside --output): broken config, edited config, a live driver
    from cullmt_ray.config import load_config

    cfg = load_config(None, [f"model.name={tiny_encdec}", f"data.dev={w['dev']}", "metric.spm=reference",
                             "data.languages=[eng_Latn, deu_Latn]", "data.directions=eng_Latn-deu_Latn",
                             f"output.dir={w['out']}", f"output.store={w['store']}"])
    import yaml

    def run_folder(name: str, config: dict, info: dict) -> str:
        d = t / "made" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (d / "run.json").write_text(json.dumps(info))
        return str(d)

    snap = json.loads(json.dumps(cfg.to_dict()))
    w["run_broken"] = run_folder("broken", {}, {"status": "failed"})
    (Path(w["run_broken"]) / "config.yaml").write_text("model: {name: [\n")
    edited = json.loads(json.dumps(snap))
    edited["search"]["threshold"] = 5.0
    w["run_edited"] = run_folder("edited", edited, {"status": "failed", "pid": 1, "config_snapshot": snap})
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "cullmt-fake-driver"])
    w["run_live"] = run_folder("live", snap, {"status": "running", "pid": live.pid, "config_snapshot": snap})
    yield w
    live.kill()
    live.wait()


def _argv(case, w: dict) -> list[str]:
    _, verb, flags, extra, _, _ = case
    argv = [verb]
    if flags is not None:
        merged = {**base_args(verb, w), **flags}
        for k, v in merged.items():
            if v is not None:
                argv += [k, v.format(**w)]
    return argv + [a.format(**w) for a in extra]


@pytest.fixture(scope="module")
def outcomes(world) -> dict:
    """Every case's outcome and what it left behind."""
    t = Path(world["tmp"])
    watched = [world[k] for k in ("store", "store_empty", "store_foreign", "file")]
    before = {"rows": _rows(Path(world["store"])), "made": _tree(t / "made"),
              "files": {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in watched}}
    cases = [{"argv": _argv(c, world), "cwd": world["cwd"]} for c in CASES]
    results = dict(zip([c[0] for c in CASES], run_cases(cases, ENV)))
    (t / "outcomes.json").write_text(json.dumps(results, indent=1))  # to read when a case fails
    return {"results": results, "before": before, "watched": watched}


def test_matrix_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, outcomes):
    name, verb, _, _, code, message = case
    r = outcomes["results"][name]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert "Traceback" not in r["stderr"] + r["stdout"], r["stderr"][-2000:]
    assert len(lines) == 1, r["stderr"][-2000:]
    assert lines[0].startswith(f"cullmt-ray {verb}: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert r["code"] == code, (r["code"], lines[0])
    # nothing left behind, nothing changed
    assert not Path(world["out"]).exists() or not any(Path(world["out"]).iterdir())
    assert not (Path(world["cwd"]) / "results").exists()
    assert _rows(Path(world["store"])) == outcomes["before"]["rows"]


def test_nothing_changed(world, outcomes):
    """After every case: the store's rows, the broken files and the run folders are byte for byte as before."""
    t = Path(world["tmp"])
    assert _rows(Path(world["store"])) == outcomes["before"]["rows"] == 2
    for f in outcomes["watched"][1:]:
        assert hashlib.sha256(Path(f).read_bytes()).hexdigest() == outcomes["before"]["files"][f], f
    assert Path(world["store_empty"]).stat().st_size == 0
    assert _tree(t / "made") == outcomes["before"]["made"]
    slow = {n: r["seconds"] for n, r in outcomes["results"].items() if r["seconds"] > 20}
    assert not slow, f"cases that did not fail fast (before Ray): {slow}"


@pytest.mark.parametrize("name", sorted(REAL_PROCESS))
def test_real_process_answers_the_same(name, world, outcomes):
    """A few cases as real ``python -m cullmt_ray.cli`` processes: the same code and line as the forked ones."""
    case = next(c for c in CASES if c[0] == name)
    out = subprocess.run([sys.executable, "-m", "cullmt_ray.cli", *_argv(case, world)], capture_output=True,
                         text=True, env=ENV, cwd=world["cwd"], timeout=300)
    forked = outcomes["results"][name]
    assert out.returncode == forked["code"] == case[4]
    assert out.stderr.strip() == forked["stderr"].strip()
