"""Healing pruned candidates: sequence-level KD from the unpruned model + LoRA, trained with Ray Train.

- :mod:`.kd`: teacher translations of a parallel corpus via the evaluator actors, cached as Parquet;
- :mod:`.lora`: the Ray Train (``TorchTrainer``) loop: DDP, checkpoints, resume, validation;
- :mod:`.export`: merge the adapter, save model + tokenizer + card (loads with plain transformers);
- :mod:`.pipeline`: ``cullmt-ray heal RUN_DIR --candidate best|pareto|ID`` end to end.
"""

from .config import HealConfig, load_heal_config
from .pipeline import HealError, resume_heal, run_heal, select_candidates

__all__ = ["HealConfig", "HealError", "load_heal_config", "resume_heal", "run_heal", "select_candidates"]
