"""Shared fixtures: one local Ray cluster per test session, tiny models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CULLMT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use local models only; never wait on the network

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs), started once and stopped at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_encdec(tmp_path_factory) -> Path:
    """Random 3+3-layer NLLB-architecture model whose enc.1 and dec.2 are exact identities."""
    from cullmt_ray.tiny import build_encdec

    return build_encdec(tmp_path_factory.mktemp("m") / "encdec", 3, 3, d_model=64, identity=("enc.1", "dec.2"),
                        init_std=0.02)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Random 4-layer Llama whose layer.2 is an exact identity."""
    from cullmt_ray.tiny import build_llama

    return build_llama(tmp_path_factory.mktemp("m") / "llama", 4, d_model=64, identity=("layer.2",))


@pytest.fixture(scope="session")
def demo_sources() -> list[str]:
    from cullmt_ray.data import load_devset

    return list(load_devset("builtin:demo").lines["eng_Latn"][:12])


def write_self_reference_devset(model_dir: Path, out_dir: Path, sources: list[str], removed: tuple[str, ...] = (),
                                src: str = "eng_Latn", tgt: str = "deu_Latn") -> Path:
    """A 2-language dev set whose references are the model's own outputs with ``removed`` taken out.

    Against it the unpruned model scores 100 when ``removed`` is empty: removing an identity
    layer keeps 100, removing a real layer lowers the score, and removing a layer listed in
    ``removed`` (a 'destructive' layer) raises it to 100.
    """
    from cullmt_ray.config import ModelConfig
    from cullmt_ray.families import load_family

    fam = load_family(ModelConfig(str(model_dir)))
    with fam.apply(removed):
        refs = fam.translate(sources, src, tgt)
    assert all(refs), "the tiny model produced an empty output; pick another seed"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{src}.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (out_dir / f"{tgt}.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    return out_dir


def search_config(tmp_path, model, dev, **extra):
    """A search config over a 2-language self-reference dev set; ``a__b=v`` sets ``a.b=v``."""
    from cullmt_ray.config import load_config

    sets = [f"model.name={model}", f"data.dev={dev}", "data.languages=[eng_Latn, deu_Latn]",
            "data.directions=eng_Latn-deu_Latn", "data.max_sentences=null", "metric.spm=reference",
            "search.threshold=0.0", f"output.dir={tmp_path / 'runs'}", f"output.store={tmp_path / 'store.sqlite'}",
            "resources.actors=2", "name=t"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(None, sets)


# ----------------------------------------------------------------------------- PostgreSQL
PG_PASSWORD = "s3cret-pw"  # the test server wants a password over TCP (scram), so masking is tested for real


def _pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    import shutil

    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if
                   p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on a free port (initdb + pg_ctl, data in /tmp, fsync off), its base URL
    ``postgresql://cullmt:PASSWORD@127.0.0.1:PORT``; skipped, with the reason, where none can start.
    As root the server runs as the ``postgres`` user (initdb refuses root), through runuser."""
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg: pip install -e '.[postgres]'",
                        exc_type=ImportError)
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server: initdb/pg_ctl are neither on PATH nor under /usr/lib/postgresql/*/bin "
                    "(apt-get install postgresql)")
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="cullmt-pg-"))
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or not shutil.which("runuser"):
            pytest.skip("running as root, and no postgres user or runuser to start PostgreSQL as another user")
        prefix = ["runuser", "-u", user, "--"]
        pw = pwd.getpwnam(user)
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    (pwfile := folder / "pw").write_text(PG_PASSWORD + "\n")
    os.chmod(pwfile, 0o644)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, logfile = folder / "data", folder / "log"
    run = lambda *a: subprocess.run(prefix + [str(bindir / a[0]), *a[1:]], capture_output=True, text=True)  # noqa: E731
    out = run("initdb", "-D", str(data), "-U", "cullmt", "--pwfile", str(pwfile), "--auth-local=trust",
              "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
    if out.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off " \
           "-c full_page_writes=off -c max_connections=200"
    out = run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(logfile), "-w", "-t", "60", "start")
    if out.returncode != 0:
        log = logfile.read_text()[-500:] if logfile.exists() else out.stderr
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {log}")
    try:
        yield f"postgresql://cullmt:{PG_PASSWORD}@127.0.0.1:{port}"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def new_database(server: str) -> str:
    """A fresh, empty database on the test server; its URL."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """Where a store test puts its store: a SQLite file, or a fresh PostgreSQL database (skipped without a server)."""
    if request.param == "sqlite":
        return str(tmp_path / "s.sqlite")
    return new_database(request.getfixturevalue("postgres_server"))
