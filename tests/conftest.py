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
