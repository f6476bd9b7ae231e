"""Search configs: YAML (``search_spaces/*.yaml``) + ``--set a.b=value`` flags -> validated dataclasses.

One dataclass per concept, each section checking itself (``check``) as it is built, so a config
object that exists is valid. Every error is one line naming the bad field, its value and what is
expected. Torch-free and Ray-free.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError


class ConfigError(ValueError):
    """A bad config value; the message names the field."""


def _positive(where: str, value: float | None, *, zero: bool = False, none: bool = False) -> None:
    """``value`` > 0 (>= 0 with ``zero``; None allowed with ``none``), else a one-line error."""
    if value is None and none:
        return
    if value is None or value < 0 or (value == 0 and not zero):
        least = ">= 0" if zero else ">= 1" if isinstance(value, int) else "> 0"
        raise ConfigError(f"{where}={value!r}: expected {least}{' (or null)' if none else ''}")


def _one_of(where: str, value: Any, allowed: typing.Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{where}={value!r}: expected one of {', '.join(map(str, allowed))}")


def _plain_name(where: str, value: str) -> None:
    if not value or any(c in value for c in "/\\ ") or value in (".", ".."):
        raise ConfigError(f"{where}={value!r}: expected a non-empty name without spaces or slashes")


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class ModelConfig:
    """What model to load and how (also what every evaluator actor receives)."""

    name: str = "reference:dense"  # reference:NAME, a hub name, or a local path
    family: str = "auto"  # auto | encdec | decoder | moe
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"
    trust_remote_code: bool = False
    prompt_template: str | None = None  # decoder-only models without a chat template

    def check(self) -> None:
        if not self.name.strip():
            raise ConfigError("model.name='': expected reference:dense, a hub name or a local model folder")
        _one_of("model.family", self.family, ("auto", "encdec", "decoder", "moe"))
        _one_of("model.dtype", self.dtype, DTYPES)


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

    def check(self) -> None:
        _positive("data.max_sentences", self.max_sentences, none=True)
        if not self.languages:
            raise ConfigError("data.languages: the list is empty; expected language codes such as eng_Latn, de")


@dataclass
class MetricConfig:
    primary: str = "spbleu"  # spbleu | chrf++ | bleu
    # auto: flores200, except 'reference' (the shipped SPM) for the shipped reference models
    spm: str = "auto"  # auto | flores200 | reference | PATH to a SentencePiece model
    metrics: list[str] = field(default_factory=lambda: ["spbleu", "chrf++", "bleu"])

    def check(self) -> None:
        from .metrics import DECODED

        _one_of("metric.primary", self.primary, DECODED)
        for m in self.metrics:
            _one_of("metric.metrics", m, DECODED)

    @property
    def scored(self) -> list[str]:
        """Every metric computed: the primary one first."""
        return [self.primary, *(m for m in self.metrics if m != self.primary)]

    def spm_for(self, model: str) -> str:
        """The SentencePiece model spBLEU uses: ``auto`` resolves by model."""
        if self.spm != "auto":
            return self.spm
        return "reference" if model.startswith("reference:") else "flores200"


@dataclass
class FidelityConfig:
    """Staged scoring of each batch of candidates (successive halving); each stage passes on its
    best ``keep`` fraction: ``proxy`` (teacher-forced KL to the full model, no decoding), then the
    first ``sentences`` sentences per direction, then the whole dev set."""

    sentences: int | None = None  # None: no sentence-subset stage
    proxy: str | None = None  # kl | None: no proxy stage
    keep: float = 0.5

    def check(self) -> None:
        _positive("search.fidelity.sentences", self.sentences, none=True)
        if not 0 < self.keep <= 1:
            raise ConfigError(f"search.fidelity.keep={self.keep}: expected a fraction in (0, 1]")
        if self.proxy not in (None, "kl"):
            raise ConfigError(f"search.fidelity.proxy={self.proxy!r}: expected kl or null (off)")

    @property
    def staged(self) -> bool:
        return self.sentences is not None or self.proxy is not None


@dataclass(frozen=True)
class Decoding:
    """Decoding settings; part of every evaluation's identity."""

    num_beams: int = 1
    max_new_tokens: int = 128
    batch_size: int = 32

    def check(self, where: str = "decoding") -> None:
        for f in dataclasses.fields(self):
            _positive(f"{where}.{f.name}", getattr(self, f.name))


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
    # Racing (greedy and beam, local driver): each step's candidates are decoded chunk by chunk
    # (racing_chunk sentences per direction, later chunks half the sentences seen); one leaves as
    # soon as a paired bootstrap says with racing_confidence that it is below the step's leader
    # (beam: width-th best) or the threshold; those that could be on the Pareto front are scored in
    # full at the end. auto: on for the search verb's greedy/beam wherever the greedy loop decodes
    # (rows exact: fp32 on CPU), else off.
    racing: bool | str = "auto"
    racing_chunk: int = 20
    racing_confidence: float = 0.99

    def races(self, verb: str, exact_rows: bool) -> bool:
        """Whether ``verb``'s greedy/beam steps race (``racing``; ``auto``: the search verb's greedy or beam,
        local driver, no fidelity stages, on replicas whose rows are exact, where a race chunk costs no
        decoding of its own)."""
        if self.racing != "auto":
            return bool(self.racing)
        return verb == "search" and exact_rows and self.strategy in ("greedy", "beam") and self.driver == "local" \
            and not self.fidelity.staged

    def check(self) -> None:
        from .strategies import STRATEGIES
        from .units import parse_unit

        _one_of("search.strategy", self.strategy, STRATEGIES)
        _one_of("search.driver", self.driver, ("local", "tune"))
        _positive("search.racing_chunk", self.racing_chunk)
        if not 0.5 <= self.racing_confidence < 1:
            raise ConfigError(f"search.racing_confidence={self.racing_confidence}: expected a probability in [0.5, 1)")
        if self.racing not in (True, False, "auto"):
            raise ConfigError(f"search.racing={self.racing!r}: expected true, false or auto")
        if self.racing is True and (self.strategy not in ("greedy", "beam") or self.driver != "local" or self.fidelity.staged):
            raise ConfigError(f"search.racing=true: races the steps of strategy greedy or beam with search.driver=local "
                              f"and no search.fidelity stages (got strategy {self.strategy!r}, driver {self.driver!r})")
        if self.fidelity.staged and self.driver == "tune":
            raise ConfigError("search.fidelity: staged scoring runs with search.driver=local only")
        _positive("search.max_evaluations", self.max_evaluations, none=True)
        _positive("search.threshold", self.threshold, zero=True)
        _positive("search.target_removed", self.target_removed, none=True)
        if self.target_params_fraction is not None and not 0 < self.target_params_fraction < 1:
            raise ConfigError(f"search.target_params_fraction={self.target_params_fraction}: expected 0 < x < 1")
        for u in self.protect:
            try:
                parse_unit(u)
            except ValueError as e:
                raise ConfigError(f"search.protect: {e}") from None
        for name, opts in self.options.items():
            _one_of("search.options", name, STRATEGIES)
            if not isinstance(opts, dict):
                raise ConfigError(f"search.options.{name}={opts!r}: expected a mapping of options, e.g. {{width: 3}}")
            known = STRATEGIES[name].options()
            unknown = [k for k in opts if k not in known]
            if unknown:
                raise ConfigError(f"search.options.{name}.{unknown[0]}: not an option of strategy {name!r}; "
                                  f"expected one of {', '.join(known) or '(none)'}")


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

    def check(self) -> None:
        _positive("resources.actors", self.actors, none=True)
        _positive("resources.cpus_per_actor", self.cpus_per_actor)
        _positive("resources.gpus_per_actor", self.gpus_per_actor, zero=True, none=True)
        _positive("resources.reserve_cpus", self.reserve_cpus, zero=True)
        _positive("resources.num_cpus", self.num_cpus, none=True)
        _one_of("resources.placement", self.placement, ("spread", "pack"))
        if not 0 < self.trial_cpus <= self.reserve_cpus:
            raise ConfigError(f"resources.trial_cpus={self.trial_cpus}: expected > 0 and <= "
                              f"resources.reserve_cpus ({self.reserve_cpus}), the CPUs the actors leave free")
        for k, v in self.actor_resources.items():
            if k in ("CPU", "GPU", "memory") or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"resources.actor_resources.{k}={v!r}: expected a custom resource name "
                                  "(not CPU/GPU/memory) and an amount > 0, e.g. {cullmt: 1}")


@dataclass
class OutputConfig:
    dir: str = "results/runs"
    store: str = "results/store.sqlite"  # a SQLite file, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (dburl.py)

    def check(self) -> None:
        from .dburl import StoreError, parse_store

        try:
            parse_store(self.store)
        except StoreError as e:
            raise ConfigError(f"output.store: {e}") from None


EXPERT_CONTROLS = ("random", "reverse")


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

    def check(self) -> None:
        from .experts import SCORES

        for r in self.rates:
            if not 0 < r < 1:
                raise ConfigError(f"experts.rates: {r} is not a fraction of experts removed in (0, 1)")
        for c in self.controls:
            _one_of("experts.controls", c, EXPERT_CONTROLS)
        _positive("experts.stats_sentences", self.stats_sentences, none=True)
        _one_of("experts.score", self.score, SCORES)
        _one_of("experts.mode", self.mode, ("global", "per_layer"))
        _one_of("experts.granularity", self.granularity, ("language", "pair"))
        _positive("experts.enc_dec_ratio", self.enc_dec_ratio)
        _positive("experts.min_per_layer", self.min_per_layer, zero=True)


@dataclass
class NamedConfig:
    """A whole config: a name (the run folder's prefix) and its sections; saved as YAML beside the results."""

    name: str = "run"

    def check(self) -> None:
        _plain_name("name", self.name)

    def to_dict(self) -> dict:
        """The config as plain data, as written to config.yaml and run.json: URL passwords masked."""
        from .dburl import mask_secrets

        return mask_secrets(dataclasses.asdict(self))


@dataclass
class SearchRunConfig(NamedConfig):
    name: str = "search"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    decoding: Decoding = field(default_factory=Decoding)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)


# ----------------------------------------------------------------------------- reading
_LAX = ConfigDict(allow_inf_nan=False, coerce_numbers_to_str=True)
_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          dict: "a mapping, e.g. {width: 3}"}


def _options(typ: Any) -> tuple[list, bool]:
    """The non-None types of a (maybe optional) field type, and whether None is allowed."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        return [a for a in args if a is not type(None)], type(None) in args
    return [typ], False


def _check(value: Any, typ: Any, where: str) -> Any:
    """``value`` coerced to a field's type (pydantic's lax mode: "3" -> 3, "yes" -> True, finite numbers
    only); a list field also takes "a,b" or a single value. A mismatch is a one-line ConfigError."""
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, where)
    options, nullable = _options(typ)
    if len(options) == 1 and typing.get_origin(options[0]) is list and value is not None \
            and not isinstance(value, (list, dict)):
        value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
    try:
        return TypeAdapter(typ, config=_LAX).validate_python(value)
    except ValidationError as e:
        err = e.errors()[0]
        at = "".join(f"[{i}]" for i in err["loc"] if isinstance(i, int))
        if err["type"] == "finite_number":
            raise ConfigError(f"{where}{at}={value!r}: expected a finite number") from None
        words = " or ".join("a list" if typing.get_origin(o) is list else _WORDS.get(o, str(o)) for o in options)
        raise ConfigError(f"{where}={value!r}: expected {words}{' (or null)' if nullable else ''}") from None


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """A checked ``cls`` from a mapping: unknown fields, bad types and bad values are one-line errors."""
    if data is None:
        data = {}
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
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(where) if cls is Decoding else obj.check()
    return obj


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
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{kind} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{kind} {path}: expected a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. {example_override}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> SearchRunConfig:
    """A YAML config (or ``data``, or the defaults) with ``key.sub=value`` overrides, checked."""
    return from_dict(SearchRunConfig, read_yaml(path, overrides, data))
