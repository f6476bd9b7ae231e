"""Configs: every shipped search space validates; overrides and errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cullmt_ray.config import ConfigError, load_config

ALL = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))
HEAL_RECIPES = [p for p in ALL if p.name.startswith("heal_")]
SPACES = [p for p in ALL if p not in HEAL_RECIPES]


@pytest.mark.parametrize("path", HEAL_RECIPES, ids=lambda p: p.name)
def test_shipped_heal_recipes_validate(path):
    from cullmt_ray.heal.config import load_heal_config

    load_heal_config(path)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_search_spaces_validate(path):
    cfg = load_config(path)
    assert cfg.metric.scored[0] == cfg.metric.primary and cfg.metric.spm_for(cfg.model.name) != "auto"


def test_defaults_are_the_embedded_demo():
    cfg = load_config(None)
    assert cfg.model.name == "reference:dense" and cfg.data.dev == "builtin:demo"
    assert cfg.metric.spm_for(cfg.model.name) == "reference" and cfg.search.strategy == "greedy"


def test_overrides_and_types():
    cfg = load_config(None, ["search.threshold=1.5", "data.languages=en,de", "search.protect=[enc.0, dec.5]",
                             "data.max_sentences=null", "model.name=facebook/nllb-200-distilled-600M"])
    assert cfg.search.threshold == 1.5 and cfg.data.languages == ["en", "de"]
    assert cfg.search.protect == ["enc.0", "dec.5"] and cfg.data.max_sentences is None
    assert cfg.metric.spm_for(cfg.model.name) == "flores200"  # auto: flores200 for non-reference models


def test_a_single_value_is_a_list_of_one():
    cfg = load_config(None, ["search.protect=enc.0", "data.languages=de"])
    assert cfg.search.protect == ["enc.0"] and cfg.data.languages == ["de"]
    with pytest.raises(ConfigError, match="search.protect: unit 'encoder.0'"):
        load_config(None, ["search.protect=encoder.0"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan"])
def test_numbers_must_be_finite(value):
    with pytest.raises(ConfigError, match="expected a finite"):
        load_config(None, [f"search.threshold={value}"])
    with pytest.raises(ConfigError, match="search.target_removed"):
        load_config(None, [f"search.target_removed={value}"])


@pytest.mark.parametrize("sets,message", [
    (["search.threshold=abc"], "search.threshold='abc': expected a number"),
    (["bogus.x=1"], "bogus: unknown section"),
    (["model.nam=x"], "model.nam: unknown field"),
    (["search.target_params_fraction=1.5"], "expected 0 < x < 1"),
    (["resources.actors=0"], "resources.actors=0: expected >= 1"),
    (["name=a b"], "name='a b'"),
    (["search.threshold"], "expected key.sub=value"),
])
def test_config_errors_name_the_field(sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, sets)
