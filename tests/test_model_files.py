"""The driver's view of a model (cullmt_ray.model_files): units from config.json without torch, and where
transformers still decides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cullmt_ray.model_files import FamilyError, model_units, read_config


@pytest.mark.parametrize("name", ["reference:dense", "reference:llama", "reference:moe"])
def test_units_from_config_json_are_the_loaded_models(name):
    from cullmt_ray.config import ModelConfig
    from cullmt_ray.families import load_family

    fam = load_family(ModelConfig(name))
    assert isinstance(read_config(name), SimpleNamespace)  # read as JSON: every field the units need is there
    assert model_units(name) == (fam.name, fam.units())


def test_a_config_missing_a_field_goes_through_transformers(tiny_encdec, tmp_path):
    from transformers import M2M100Config

    folder = tmp_path / "m"
    shutil.copytree(tiny_encdec, folder)
    conf = json.loads((folder / "config.json").read_text())
    del conf["decoder_layers"]  # its class fills in the default
    (folder / "config.json").write_text(json.dumps(conf))
    assert not isinstance(read_config(str(folder)), SimpleNamespace)
    fam, units = model_units(str(folder))
    assert fam == "encdec" and units[:3] == ["enc.0", "enc.1", "enc.2"]
    assert len(units) == 3 + M2M100Config().decoder_layers


def test_an_unreadable_config_is_one_line(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(FamilyError, match=r"model.name=.*not a local model folder"):
        model_units(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_model", "num_hidden_layers": 2}))
    with pytest.raises(FamilyError, match=r"model.name=.*not a local model folder.*no_such_model"):
        model_units(str(folder))  # a model type transformers does not know: its error, here, not in an actor
    with pytest.raises(FamilyError, match=r"model.family='encoder': expected auto or one of encdec, decoder, moe"):
        model_units("reference:dense", family="encoder")


def test_the_driver_starts_without_torch():
    """What a search's driver runs before Ray starts (imports, preflight, units, search checks) imports neither
    torch nor transformers: they cost ~2.5 s of a 2-core machine before the cluster could start."""
    code = """
import sys
from cullmt_ray.cli import main
from cullmt_ray import evaluator, search, session
from cullmt_ray.config import load_config
cfg = load_config(None, ["model.name=reference:llama"])
session.load_devset_of(cfg)
session.preflight(cfg)
from cullmt_ray.model_files import model_units
session.check_search(cfg, model_units(cfg.model.name)[1])
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_stopping_a_local_cluster_leaves_none_of_its_processes():
    """session.stop_ray (what the CLI runs at exit) ends a cluster ensure_ray started: the autoscaler monitor first
    (killed, not left to time out on a GCS already gone), then every other process Ray started."""
    import psutil

    code = """
import json
import ray
from ray._private import ray_constants, worker
from cullmt_ray.session import ensure_ray, stop_ray
ensure_ray(None, 1)
node = worker._global_node
procs = {k: [i.process for i in v] for k, v in node.all_processes.items()}
stop_ray()
print(json.dumps({"pids": [p.pid for v in procs.values() for p in v],
                  "monitor": [p.returncode for p in procs[ray_constants.PROCESS_TYPE_MONITOR]],
                  "up": ray.is_initialized()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["monitor"] == [-9] and not got["up"]
    alive = [p for p in got["pids"] if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert len(got["pids"]) >= 4 and not alive, alive
