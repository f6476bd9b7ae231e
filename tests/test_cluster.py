"""A real two-node Ray cluster on this machine (cluster/local/local_cluster.py): a head with the
dashboard on 127.0.0.1 and token auth, and a second raylet with the custom resource ``node_b``.

``cullmt-ray submit`` sends small searches through the Ray Jobs API; the dashboard's REST API
(with the token) must show the job succeeded and evaluator actors on both nodes, and the head's
metrics endpoint must export the custom metrics. Everything the test starts is stopped, even on
failure. Deselect with ``-m "not cluster"``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cullmt_ray.cli"]
SEARCH = ["search", "--max-sentences", "8", "--target-removed", "1", "--directions", "eng_Latn-deu_Latn",
          "--set", "search.threshold=100", "--actors", "2", "--set", "resources.placement=spread"]


def _local_cluster():
    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "cluster" / "local" / "local_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cluster():
    lc = _local_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="cullmt-t-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(32)
    (tmp / "token").write_text(token)
    (tmp / "token").chmod(0o600)
    (tmp / "home").mkdir()
    try:
        info = lc.start(tmp / "ray", cpus=2, dashboard_port=None, token=token, object_store_bytes=200_000_000,
                        env={"RAY_metrics_report_interval_ms": "1000", "HF_HUB_OFFLINE": "1"})
        yield {**info, "token": token, "tmp": tmp}
    finally:
        lc.stop(tmp / "ray", timeout=5)  # gcs_server and the autoscaler monitor may outlive a SIGTERM
        shutil.rmtree(tmp, ignore_errors=True)


def _env(cluster, **extra) -> dict:
    """A client environment with no Ray token anywhere (HOME has no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)  # this checkout, from any cwd
    return {**env, "HOME": str(cluster["tmp"] / "home"), "PYTHONPATH": path, "CULLMT_NO_PROGRESS": "1",
            "HF_HUB_OFFLINE": "1", **extra}


def _get(cluster, path: str) -> dict:
    req = urllib.request.Request(cluster["dashboard"] + path, headers={"Authorization": f"Bearer {cluster['token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _metrics(cluster) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_ports']['head']}/metrics", timeout=10) as r:
        return r.read().decode()


def _samples(text: str, name: str, run_prefix: str) -> list[float]:
    pat = re.compile(rf'^{name}\{{[^}}]*run="{re.escape(run_prefix)}[^"]*"[^}}]*\}} (\S+)$', re.MULTILINE)
    return [float(v) for v in pat.findall(text)]


def test_the_dashboard_wants_the_token(cluster):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(cluster["dashboard"] + "/api/jobs/", timeout=10)
    assert e.value.code == 401 and "Missing authentication token" in e.value.read().decode()
    assert cluster["dashboard"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("how,message", [
    ("none", "requires a token and none was found; pass --token-file PATH"),
    ("wrong", "rejected the token from --token-file"),
    ("address", "--address 'ftp://x': expected auto, http(s)://HOST:PORT"),
    ("attach", "--attach cullmt-nope: no such job"),
])
def test_submit_says_what_is_missing(cluster, how, message, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-" + secrets.token_hex(8))
    args = {"none": ["--address", cluster["dashboard"]],
            "wrong": ["--address", cluster["dashboard"], "--token-file", str(wrong)],
            "address": ["--address", "ftp://x"],
            "attach": ["--address", cluster["dashboard"], "--token-file", str(cluster["tmp"] / "token"),
                       "--attach", "cullmt-nope"]}[how]
    out = subprocess.run(CLI + ["submit", *args, "--", *SEARCH], capture_output=True, text=True, timeout=120,
                         env=_env(cluster), cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cullmt-ray submit: error:") and message in last, out.stderr
    assert wrong.read_text() not in out.stdout + out.stderr


def test_search_job_runs_on_both_nodes_and_exports_metrics(cluster):
    t0 = time.time()
    tmp, token = cluster["tmp"], cluster["token"]
    sid = f"cullmt-test-{secrets.token_hex(3)}"
    cmd = CLI + ["submit", "--address", cluster["dashboard"], "--token-file", str(tmp / "token"), "--follow",
                 "--submission-id", sid, "--metadata", "purpose=test", "--",
                 *SEARCH, "--name", "clustertest", "--output", str(tmp / "runs"), "--store", str(tmp / "store.sqlite")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cluster), cwd=tmp)
    gauges: dict[str, list[float]] = {}
    while proc.poll() is None and time.time() - t0 < 240:  # gauges live while the driver does: look during the run
        try:
            text = _metrics(cluster)
        except OSError:
            text = ""
        for g in ("ray_cullmt_best_score", "ray_cullmt_baseline_score", "ray_cullmt_sentences_per_second"):
            gauges[g] = gauges.get(g) or _samples(text, g, "clustertest-")
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:] + stdout[-2000:]
    assert f"job {sid} SUCCEEDED" in stdout and "[cullmt-ray] finished" in stdout
    assert token not in stdout + stderr

    job = _get(cluster, f"/api/jobs/{sid}")
    assert job["status"] == "SUCCEEDED"
    assert job["metadata"]["cullmt_ray.command"] == "search" and job["metadata"]["purpose"] == "test"
    assert token not in json.dumps(job)  # not in metadata, entrypoint nor runtime_env

    (run_dir,) = (tmp / "runs").iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and len(run["actors"]) == 2

    nodes = _get(cluster, "/api/v0/nodes?detail=1")["data"]["result"]["result"]
    assert len(nodes) == 2
    node_b = next(n["node_id"] for n in nodes if "node_b" in n["resources_total"])
    actors = _get(cluster, "/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    evaluators = {a["name"]: a["node_id"] for a in actors if a["name"] in run["actors"]}
    assert len(evaluators) == 2
    assert set(evaluators.values()) == {n["node_id"] for n in nodes}  # one actor on each node
    assert node_b in evaluators.values()
    for name, node in evaluators.items():  # evaluator-<node>-<run>-<slot>, the node it ran on
        assert name.startswith(f"evaluator-{node[:8]}-{run_dir.name}-"), name

    assert all(gauges.values()) and len(gauges) == 3, gauges
    assert sum(_samples(_metrics(cluster), "ray_cullmt_candidates_evaluated_total", run_dir.name)) == 13

    # The same search again, as `search --address http://...` (submitted as a job; token from
    # RAY_AUTH_TOKEN): every candidate comes from the store, and the store-hit counter says so.
    args = [*SEARCH, "--name", "again", "--output", str(tmp / "runs2"), "--store", str(tmp / "store.sqlite")]
    out = subprocess.run(CLI + [*args, "--address", cluster["dashboard"]], capture_output=True, text=True,
                         timeout=240, env=_env(cluster, RAY_AUTH_TOKEN=token), cwd=tmp, check=False)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    assert "submitting as a Ray job" in out.stdout and "SUCCEEDED" in out.stdout
    assert token not in out.stdout + out.stderr
    assert "0 evaluations computed, 13 read from the store" in out.stdout
    assert sum(_samples(_metrics(cluster), "ray_cullmt_store_hits_total", "again-")) == 13
