"""The package's shape: a torch-free, Ray-free core; one parser for unit names."""

import subprocess
import sys

import pytest

from cullmt_ray.candidate import Candidate
from cullmt_ray.units import UnitError, empties_a_group, parse_unit, sort_units, split_expert


def test_the_core_loads_neither_torch_nor_ray():
    code = ("import sys, cullmt_ray.strategies, cullmt_ray.store, cullmt_ray.pareto, cullmt_ray.config, "
            "cullmt_ray.candidate, cullmt_ray.units, cullmt_ray.evaluation, cullmt_ray.replay; "
            "from cullmt_ray.config import load_config; load_config(); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_unit_names_layers_and_experts():
    assert str(parse_unit("enc.3")) == "enc.3" and parse_unit("dec.0.expert.2").expert == 2
    assert sort_units(["dec.0", "enc.10", "enc.2", "layer.1", "enc.1.expert.3", "enc.1"]) == \
        ["enc.1", "enc.1.expert.3", "enc.2", "enc.10", "dec.0", "layer.1"]
    assert split_expert("enc.1.expert.3") == ("enc.1", 3)
    assert Candidate.parse("enc.3, enc.1,") == Candidate.of(["enc.1", "enc.3"])
    for bad in ("encoder.1", "enc.x", "enc.1.expert", "enc.-1", ""):
        with pytest.raises(UnitError, match="expected enc.I, dec.I, layer.I or enc.I.expert.E"):
            parse_unit(bad)


def test_no_stack_and_no_moe_layer_may_be_emptied():
    units = ["enc.0", "enc.1", "dec.0"]
    assert empties_a_group(units, ["enc.0"]) is None and empties_a_group(units, ["dec.0"]) == "dec"
    experts = [f"enc.1.expert.{e}" for e in range(2)] + [f"dec.1.expert.{e}" for e in range(2)]
    assert empties_a_group(experts, ["enc.1.expert.0", "dec.1.expert.1"]) is None
    assert empties_a_group(experts, ["enc.1.expert.0", "enc.1.expert.1"]) == "enc.1"
