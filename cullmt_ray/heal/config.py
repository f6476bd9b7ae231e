"""Heal recipes: a plain YAML (``search_spaces/heal_*.yaml``) + ``--set a.b=value`` -> validated dataclasses.

The search run being healed supplies the model, languages, directions, dev set and metrics; a
recipe says what to train on, how, and with what resources. Every error is one line naming the
bad field, its value and what is expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DecodingConfig, from_dict, read_yaml

MIXES = ("kd", "refs", "both")


@dataclass
class CorpusConfig:
    """Parallel training corpus: a folder of per-language files (``train.de.gz``, ``deu_Latn.txt``)
    or a .tsv/.jsonl/.parquet table with one column per language."""

    path: str = "../shared/data/multi30k"
    split: str | None = "train"  # file prefix inside a folder (train.de.gz); null for eng_Latn.txt style
    max_sentences: int | None = 2000  # source sentences per direction (null: the whole corpus)
    seed: int = 0


@dataclass
class KDConfig:
    """Sequence-level KD: the unpruned model's translations of the corpus sources."""

    cache: str = "results/kd"  # Parquet cache folder, shared by every heal
    chunk: int = 250  # sentences per actor task (the unit of resume)
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(batch_size=64))


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # stop earlier than the epochs (the schedule still ends there)
    batch_size: int = 32  # sentence pairs per worker and step
    lr: float = 1e-3
    warmup: int = 20  # steps
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    word_kd: float = 0.0  # weight of the token-level KL to the unpruned model (word-level KD); 0: sequence-level only
    hidden_kd: float = 0.0  # weight of the relative squared error to the unpruned model's final hidden states
    model_dropout: bool = False  # the frozen model's own dropout during training (the adapters' lora.dropout always)
    clip: float = 1.0
    max_len: int = 128  # tokens; longer pairs are skipped
    eval_every: int = 50  # steps between validations on the dev set (0: only before and after)
    val_sentences: int = 40  # dev sentences per direction decoded at each validation
    checkpoint_every: int = 50  # steps between checkpoints
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker failures Ray Train recovers from (from the last checkpoint)
    storage: str | None = None  # Ray Train storage (a shared path or URI on a cluster); default HEAL_DIR/train
    seed: int = 0


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "auto"  # auto: every linear layer inside the prunable layers
    stacks: str = "all"  # all: adapters in every layer stack | pruned: only in the stacks that lost layers
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class HealResources:
    workers: int = 2  # Ray Train workers per candidate (DDP)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    parallel: int | None = None  # candidates trained at once (default: as many as the cluster fits)
    address: str | None = None  # Ray address (default: the search run's)
    num_cpus: int | None = None  # CPUs of a local cluster started by cullmt-ray


@dataclass
class EvaluateConfig:
    """Where before/after scores are measured. ``dev: null`` uses the search run's dev set."""

    dev: str | None = None
    split: str | None = None
    max_sentences: int | None = None  # per direction; null: all (with dev set) / the run's (without)
    store: str | None = None  # results store for these scores (default: the search run's)


@dataclass
class ExportConfig:
    dtype: str = "auto"  # auto: as the base model is stored | float32 | float16 | bfloat16
    keep_adapter: bool = False  # also save the unmerged LoRA adapter and the pruned base it applies to


@dataclass
class HealConfig:
    name: str = "heal"
    mix: str = "kd"  # kd (teacher translations) | refs (human references) | both
    directions: str | list[str] | None = None  # default: the search run's data.directions
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    resources: HealResources = field(default_factory=HealResources)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LORA_STACKS = ("all", "pruned")
EXPORT_DTYPES = ("auto", "float32", "float16", "bfloat16")


def load_heal_config(path: str | Path | None = None, overrides: list[str] | None = None,
                     data: dict | None = None) -> HealConfig:
    """A heal recipe from YAML (or ``data``, or the defaults) with ``key.sub=value`` overrides, validated."""
    data = read_yaml(path, overrides, data, kind="heal config", example="search_spaces/heal_demo.yaml",
                     example_override="lora.r=8")
    cfg = from_dict(HealConfig, data)
    validate_heal(cfg)
    return cfg


def validate_heal(cfg: HealConfig) -> None:
    def positive(where: str, value, allow_none: bool = False, zero: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value < 0 or (value == 0 and not zero):
            raise ConfigError(f"{where}={value!r}: expected {'>= 0' if zero else '> 0'}"
                              f"{' (or null)' if allow_none else ''}")

    if cfg.mix not in MIXES:
        raise ConfigError(f"mix={cfg.mix!r}: expected one of {', '.join(MIXES)}")
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        raise ConfigError(f"name={cfg.name!r}: expected a non-empty name without spaces or slashes")
    positive("corpus.max_sentences", cfg.corpus.max_sentences, allow_none=True)
    positive("kd.chunk", cfg.kd.chunk)
    d = cfg.kd.decoding
    if d.num_beams < 1 or d.batch_size < 1 or d.max_new_tokens < 1:
        raise ConfigError("kd.decoding: num_beams, batch_size and max_new_tokens must be >= 1")
    t = cfg.train
    positive("train.epochs", t.epochs)
    positive("train.max_steps", t.max_steps, allow_none=True)
    positive("train.batch_size", t.batch_size)
    positive("train.lr", t.lr)
    positive("train.warmup", t.warmup, zero=True)
    positive("train.weight_decay", t.weight_decay, zero=True)
    positive("train.clip", t.clip)
    positive("train.max_len", t.max_len)
    positive("train.eval_every", t.eval_every, zero=True)
    positive("train.val_sentences", t.val_sentences, zero=True)
    positive("train.checkpoint_every", t.checkpoint_every)
    positive("train.keep_checkpoints", t.keep_checkpoints)
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing={t.label_smoothing}: expected 0 <= x < 1")
    if not 0 <= t.word_kd <= 1:
        raise ConfigError(f"train.word_kd={t.word_kd}: expected a weight in [0, 1] (0: sequence-level KD only)")
    positive("train.hidden_kd", t.hidden_kd, zero=True)
    if t.max_failures < -1:
        raise ConfigError(f"train.max_failures={t.max_failures}: expected >= 0 (or -1 for no limit)")
    lo = cfg.lora
    positive("lora.r", lo.r)
    positive("lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout={lo.dropout}: expected 0 <= x < 1")
    if lo.stacks not in LORA_STACKS:
        raise ConfigError(f"lora.stacks={lo.stacks!r}: expected one of {', '.join(LORA_STACKS)}")
    if isinstance(lo.target_modules, str) and lo.target_modules != "auto":
        lo.target_modules = [m.strip() for m in lo.target_modules.split(",") if m.strip()]
    if isinstance(lo.target_modules, list) and not lo.target_modules:
        raise ConfigError("lora.target_modules: the list is empty; expected module names such as [q_proj, v_proj] "
                          "or auto")
    r = cfg.resources
    positive("resources.workers", r.workers)
    positive("resources.cpus_per_worker", r.cpus_per_worker)
    positive("resources.gpus_per_worker", r.gpus_per_worker, allow_none=True, zero=True)
    positive("resources.parallel", r.parallel, allow_none=True)
    positive("evaluate.max_sentences", cfg.evaluate.max_sentences, allow_none=True)
    if cfg.export.dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export.dtype={cfg.export.dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
