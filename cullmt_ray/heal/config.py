"""Heal recipes: a plain YAML (``search_spaces/heal_*.yaml``) + ``--set a.b=value`` -> validated dataclasses.

The search run being healed supplies the model, languages, directions, dev set and metrics; a
recipe says what to train on, how, and with what resources. Every error is one line naming the
bad field, its value and what is expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, Decoding, NamedConfig, _one_of, _positive, from_dict, read_yaml

MIXES = ("kd", "refs", "both")
LAYER_KD_AT = ("cut", "kept")
SELECT = ("last", "val_kl")


@dataclass
class CorpusConfig:
    """Parallel training corpus: a folder of per-language files (``train.de.gz``, ``deu_Latn.txt``)
    or a .tsv/.jsonl/.parquet table with one column per language."""

    path: str = "../shared/data/multi30k"
    split: str | None = "train"  # file prefix inside a folder (train.de.gz); null for eng_Latn.txt style
    max_sentences: int | None = 2000  # source sentences per direction (null: the whole corpus)
    seed: int = 0

    def check(self) -> None:
        _positive("corpus.max_sentences", self.max_sentences, none=True)


@dataclass
class KDConfig:
    """Sequence-level KD: the unpruned model's translations of the corpus sources."""

    cache: str = "results/kd"  # Parquet cache folder, shared by every heal
    chunk: int = 250  # sentences per actor task (the unit of resume)
    decoding: Decoding = field(default_factory=lambda: Decoding(batch_size=64))

    def check(self) -> None:
        _positive("kd.chunk", self.chunk)


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
    layer_kd: float = 0.0  # weight of the relative squared error of kept layers' outputs to the unpruned model's
    layer_kd_at: str = "cut"  # cut: the first kept layer after each removed block (the last kept one when the top
    #                           of a stack went) | kept: every kept layer, the last one against the stack's top
    select: str = "last"  # the checkpoint exported: last | val_kl (the lowest validation KL to the unpruned model)
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

    def check(self) -> None:
        for f in ("epochs", "batch_size", "lr", "clip", "max_len", "checkpoint_every", "keep_checkpoints"):
            _positive(f"train.{f}", getattr(self, f))
        for f in ("warmup", "weight_decay", "eval_every", "val_sentences", "hidden_kd", "layer_kd"):
            _positive(f"train.{f}", getattr(self, f), zero=True)
        _positive("train.max_steps", self.max_steps, none=True)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing={self.label_smoothing}: expected 0 <= x < 1")
        if not 0 <= self.word_kd <= 1:
            raise ConfigError(f"train.word_kd={self.word_kd}: expected a weight in [0, 1] (0: sequence-level KD only)")
        _one_of("train.layer_kd_at", self.layer_kd_at, LAYER_KD_AT)
        _one_of("train.select", self.select, SELECT)
        if self.select == "val_kl" and not self.val_sentences:
            raise ConfigError("train.select=val_kl: needs validation sentences (train.val_sentences > 0)")
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures={self.max_failures}: expected >= 0 (or -1 for no limit)")


LORA_STACKS = ("all", "pruned")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "auto"  # auto: every linear layer inside the prunable layers
    stacks: str = "all"  # all: adapters in every layer stack | pruned: only in the stacks that lost layers
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "auto":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def check(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout}: expected 0 <= x < 1")
        _one_of("lora.stacks", self.stacks, LORA_STACKS)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules: the list is empty; expected module names such as "
                              "[q_proj, v_proj] or auto")


@dataclass
class HealResources:
    workers: int = 2  # Ray Train workers per candidate (DDP)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    parallel: int | None = None  # candidates trained at once (default: as many as the cluster fits)
    address: str | None = None  # Ray address (default: the search run's)
    num_cpus: int | None = None  # CPUs of a local cluster started by cullmt-ray

    def check(self) -> None:
        _positive("resources.workers", self.workers)
        _positive("resources.cpus_per_worker", self.cpus_per_worker)
        _positive("resources.gpus_per_worker", self.gpus_per_worker, zero=True, none=True)
        _positive("resources.parallel", self.parallel, none=True)
        _positive("resources.num_cpus", self.num_cpus, none=True)


@dataclass
class EvaluateConfig:
    """Where before/after scores are measured. ``dev: null`` uses the search run's dev set."""

    dev: str | None = None
    split: str | None = None
    max_sentences: int | None = None  # per direction; null: all (with dev set) / the run's (without)
    store: str | None = None  # results store for these scores (default: the search run's)

    def check(self) -> None:
        _positive("evaluate.max_sentences", self.max_sentences, none=True)


EXPORT_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ExportConfig:
    dtype: str = "auto"  # auto: as the base model is stored | float32 | float16 | bfloat16
    keep_adapter: bool = False  # also save the unmerged LoRA adapter and the pruned base it applies to

    def check(self) -> None:
        _one_of("export.dtype", self.dtype, EXPORT_DTYPES)


@dataclass
class HealConfig(NamedConfig):
    name: str = "heal"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    directions: str | list[str] | None = None  # default: the search run's data.directions
    kd: KDConfig = field(default_factory=KDConfig)
    mix: str = "kd"  # kd (teacher translations) | refs (human references) | both
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    resources: HealResources = field(default_factory=HealResources)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def check(self) -> None:
        super().check()
        _one_of("mix", self.mix, MIXES)


def load_heal_config(path: str | Path | None = None, overrides: list[str] | None = None,
                     data: dict | None = None) -> HealConfig:
    """A heal recipe from YAML (or ``data``, or the defaults) with ``key.sub=value`` overrides, checked."""
    return from_dict(HealConfig, read_yaml(path, overrides, data, kind="heal config",
                                           example="search_spaces/heal_demo.yaml", example_override="lora.r=8"))
