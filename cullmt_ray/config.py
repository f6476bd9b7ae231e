"""Search configs: YAML (``search_spaces/*.yaml``) + ``--set a.b=value`` flags -> validated dataclasses.

Every error is one line naming the bad field, its value and what is expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the field."""


@dataclass
class ModelConfig:
    name: str = "reference:dense"  # reference:NAME, a hub name, or a local path
    family: str = "auto"  # auto | encdec | decoder
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"
    trust_remote_code: bool = False
    prompt_template: str | None = None  # decoder-only models without a chat template


@dataclass
class DataConfig:
    dev: str = "builtin:demo"  # builtin:demo | hub:flores_plus | hub:ntrex | DIR | FILE.tsv/.jsonl/.parquet
    split: str | None = None  # file prefix inside DIR, e.g. val for val.de.gz
    languages: list[str] = field(default_factory=lambda: ["eng_Latn", "deu_Latn", "fra_Latn", "ces_Latn"])
    directions: str | list[str] = "english-centric"  # all | english-centric | [src-tgt, ...]
    calibration: str | list[str] | None = None  # directions the search scores on (default: all directions)
    heldout: bool = True  # also score final candidates on the directions outside calibration
    max_sentences: int | None = 100
    seed: int = 0


@dataclass
class MetricConfig:
    primary: str = "spbleu"  # spbleu | chrf++ | bleu
    # auto: flores200, except 'reference' (the shipped SPM) for the shipped reference models
    spm: str = "auto"  # auto | flores200 | reference | PATH to a SentencePiece model
    metrics: list[str] = field(default_factory=lambda: ["spbleu", "chrf++", "bleu"])


@dataclass
class FidelityConfig:
    """Staged scoring of each batch of candidates (successive halving); each stage passes on its
    best ``keep`` fraction: ``proxy`` (teacher-forced KL to the full model, no decoding), then the
    first ``sentences`` sentences per direction, then the whole dev set."""

    sentences: int | None = None  # None: no sentence-subset stage
    proxy: str | None = None  # kl | None: no proxy stage
    keep: float = 0.5


@dataclass
class DecodingConfig:
    num_beams: int = 1
    max_new_tokens: int = 128
    batch_size: int = 32


@dataclass
class SearchConfig:
    strategy: str = "greedy"
    threshold: float = 2.0  # max drop of the primary metric from the baseline (points)
    target_removed: int | None = None
    target_params_fraction: float | None = None
    protect: list[str] = field(default_factory=list)  # units never removed
    max_evaluations: int | None = None  # distinct candidates a strategy may ask for (store hits count too)
    seed: int = 0
    seed_from_store: bool = True  # start from evaluations already in the store (other strategies, runs)
    options: dict = field(default_factory=dict)  # per strategy, e.g. {beam: {width: 3}}
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    driver: str = "local"  # local (the driver loop) | tune (each candidate a Ray Tune trial)


@dataclass
class ResourcesConfig:
    address: str | None = None  # Ray address: None starts a local cluster; auto | ray://... | http://...
    actors: int | None = None  # default: one per GPU, else one per CPU slot
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    reserve_cpus: float = 0.1
    trial_cpus: float = 0.05  # CPUs per Tune trial (trials only message the actors)
    num_cpus: int | None = None  # CPUs for a local cluster started by cullmt-ray
    placement: str = "spread"  # spread: actors round-robin over the nodes | pack: fill one node, then the next
    actor_resources: dict = field(default_factory=dict)  # custom resources each actor needs, e.g. {cullmt: 1}


@dataclass
class OutputConfig:
    dir: str = "results/runs"
    store: str = "results/store.sqlite"


@dataclass
class ExpertsConfig:
    """Language-specific expert pruning of NLLB-MoE (``cullmt-ray experts``; see cullmt_ray/experts.py).

    Gate statistics come from ``stats_dev``/``stats_split`` (its first ``stats_sentences`` lines
    per language); the pruned models are scored on ``data`` (the evaluation set)."""

    stats_dev: str | None = None  # default: data.dev
    stats_split: str | None = None  # e.g. val (default: data.split)
    stats_sentences: int | None = 200
    teacher_forced: bool = False  # statistics while scoring the references instead of while translating
    rates: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.8])  # fractions of experts removed
    score: str = "importance"  # importance | activity | top1 | mean_prob
    mode: str = "global"  # global (threshold over a side's layers) | per_layer
    min_per_layer: int = 1
    enc_dec_ratio: float = 3.0  # kept encoder : decoder experts
    granularity: str = "language"  # language | pair
    # Controls scored beside each selection, same rate and experts per layer: random (random experts
    # in each layer) | reverse (the selection made for the reverse direction: other languages' experts)
    controls: list[str] = field(default_factory=list)


EXPERT_CONTROLS = ("random", "reverse")


@dataclass
class SearchRunConfig:
    name: str = "search"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(value: Any, typ: Any, where: str) -> Any:
    """Coerce/validate ``value`` against a dataclass field type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping, e.g. {{width: 3}}")
        return value
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where)
    if origin is list:
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, list):
            raise ConfigError(f"{where}={value!r}: expected a list")
        (inner,) = typing.get_args(typ)
        return [_check(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected a number")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: expected {'an integer' if typ is int else 'a number'}") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return str(value)
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field; expected one of {', '.join(sorted(names))}"
                          if where != "config" else
                          f"{unknown[0]}: unknown section; expected one of {', '.join(sorted(names))}")
    kwargs = {k: _check(v, hints[k], k if where == "config" else f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def read_yaml(path: str | Path | None, overrides: list[str] | None, data: dict | None = None, *,
              kind: str = "config", example: str = "search_spaces/demo_dense.yaml",
              example_override: str = "search.threshold=1.5") -> dict:
    """The YAML at ``path`` (or ``data``, or nothing) as a dict, with ``key.sub=value`` overrides applied;
    a missing file, bad YAML or a malformed override is a one-line :class:`ConfigError`."""
    data = dict(data or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{kind} {str(path)!r} does not exist; expected a YAML file such as {example}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{kind} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. {example_override}")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SearchRunConfig:
    """Read a YAML config (or the defaults), apply ``key.sub=value`` overrides, validate."""
    cfg = from_dict(SearchRunConfig, read_yaml(path, overrides))
    validate(cfg)
    return cfg


def validate(cfg: SearchRunConfig) -> None:
    from .metrics import METRICS

    ex = cfg.experts
    for r in ex.rates:
        if not 0 < r < 1:
            raise ConfigError(f"experts.rates: {r} is not a fraction of experts removed in (0, 1)")
    bad = [c for c in ex.controls if c not in EXPERT_CONTROLS]
    if bad:
        raise ConfigError(f"experts.controls: {bad[0]!r} is not one of {', '.join(EXPERT_CONTROLS)}")
    if ex.stats_sentences is not None and ex.stats_sentences < 1:
        raise ConfigError(f"experts.stats_sentences={ex.stats_sentences}: expected >= 1 (or null for all)")
    from .experts import Selection

    try:
        Selection(0.5, ex.score, ex.mode, ex.min_per_layer, ex.enc_dec_ratio, ex.granularity).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.metric.primary not in METRICS:
        raise ConfigError(f"metric.primary={cfg.metric.primary!r}: expected one of {', '.join(METRICS)}")
    for m in cfg.metric.metrics:
        if m not in METRICS:
            raise ConfigError(f"metric.metrics: {m!r} is not a metric; expected {', '.join(METRICS)}")
    if cfg.metric.spm == "auto":
        cfg.metric.spm = "reference" if cfg.model.name.startswith("reference:") else "flores200"
    if cfg.metric.primary not in cfg.metric.metrics:
        cfg.metric.metrics = [cfg.metric.primary, *cfg.metric.metrics]
    from .strategies import STRATEGIES

    if cfg.search.strategy not in STRATEGIES:
        raise ConfigError(f"search.strategy={cfg.search.strategy!r}: expected one of {', '.join(STRATEGIES)}")
    fid = cfg.search.fidelity
    if fid.sentences is not None and fid.sentences < 1:
        raise ConfigError(f"search.fidelity.sentences={fid.sentences}: expected >= 1 sentences (or null for off)")
    if not 0 < fid.keep <= 1:
        raise ConfigError(f"search.fidelity.keep={fid.keep}: expected a fraction in (0, 1]")
    if fid.proxy not in (None, "kl"):
        raise ConfigError(f"search.fidelity.proxy={fid.proxy!r}: expected kl or null (off)")
    if (fid.sentences is not None or fid.proxy) and cfg.search.driver == "tune":
        raise ConfigError("search.fidelity: staged scoring runs with search.driver=local only")
    if cfg.search.driver not in ("local", "tune"):
        raise ConfigError(f"search.driver={cfg.search.driver!r}: expected local or tune")
    if not 0 < cfg.resources.trial_cpus <= cfg.resources.reserve_cpus:
        raise ConfigError(f"resources.trial_cpus={cfg.resources.trial_cpus}: expected > 0 and <= "
                          f"resources.reserve_cpus ({cfg.resources.reserve_cpus}), the CPUs the actors leave free")
    if cfg.search.max_evaluations is not None and cfg.search.max_evaluations < 1:
        raise ConfigError(f"search.max_evaluations={cfg.search.max_evaluations}: expected >= 1")
    if cfg.search.threshold < 0:
        raise ConfigError(f"search.threshold={cfg.search.threshold}: expected >= 0 (metric points)")
    if cfg.search.target_params_fraction is not None and not 0 < cfg.search.target_params_fraction < 1:
        raise ConfigError(f"search.target_params_fraction={cfg.search.target_params_fraction}: expected 0 < x < 1")
    if cfg.search.target_removed is not None and cfg.search.target_removed < 1:
        raise ConfigError(f"search.target_removed={cfg.search.target_removed}: expected >= 1")
    if cfg.decoding.num_beams < 1 or cfg.decoding.batch_size < 1 or cfg.decoding.max_new_tokens < 1:
        raise ConfigError("decoding: num_beams, batch_size and max_new_tokens must be >= 1")
    if cfg.data.max_sentences is not None and cfg.data.max_sentences < 1:
        raise ConfigError(f"data.max_sentences={cfg.data.max_sentences}: expected >= 1 (or null for all)")
    if cfg.resources.actors is not None and cfg.resources.actors < 1:
        raise ConfigError(f"resources.actors={cfg.resources.actors}: expected >= 1")
    if cfg.resources.cpus_per_actor <= 0:
        raise ConfigError(f"resources.cpus_per_actor={cfg.resources.cpus_per_actor}: expected > 0")
    if cfg.resources.placement not in ("spread", "pack"):
        raise ConfigError(f"resources.placement={cfg.resources.placement!r}: expected spread or pack")
    for k, v in cfg.resources.actor_resources.items():
        if k in ("CPU", "GPU", "memory") or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"resources.actor_resources.{k}={v!r}: expected a custom resource name "
                              "(not CPU/GPU/memory) and an amount > 0, e.g. {cullmt: 1}")
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        raise ConfigError(f"name={cfg.name!r}: expected a non-empty name without spaces or slashes")
