"""LoRA fine-tuning of a pruned model with Ray Train (``TorchTrainer``, DDP: gloo on CPU, NCCL on GPU).

Every worker loads the model, removes the candidate's units (``family.apply``, no copies),
injects LoRA adapters (peft) into the configured linear layers and trains on its shard of the
sentence pairs. Rank 0 writes a checkpoint (adapter, optimizer, loop state) every
``train.checkpoint_every`` steps; after a worker failure Ray Train restarts the worker group
(``FailureConfig(max_failures)``) and the loop resumes from the last checkpoint, at the same
batch of the same epoch. Validation on the dev set (decoded with the primary metric, plus
teacher-forced loss on the references and on the teacher's translations) runs before training,
every ``train.eval_every`` steps and at the end, its directions spread over the workers.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Decoding, ModelConfig
from ..families import FamilyError, ModelFamily
from ..families.base import Example
from ..units import parse_unit, unit_stack


# ----------------------------------------------------------------------------- LoRA targets
def linear_names(family: ModelFamily) -> list[str]:
    """Leaf names of the linear layers inside the prunable layers (``q_proj``, ``fc1``, ...)."""
    names = set()
    for s in family.stacks:
        for layer in s.layers:
            names |= {n.split(".")[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def resolve_targets(family: ModelFamily, target_modules: str | list[str]) -> list[str]:
    """``auto`` -> every linear layer name inside the layers; a list is checked against the model."""
    have = linear_names(family)
    if target_modules == "auto":
        return have
    bad = [m for m in target_modules if m not in have]
    if bad:
        raise FamilyError(f"lora.target_modules: {bad[0]!r} matches no linear layer of {family.model_id}; "
                          f"its layers have {', '.join(have)} (or use auto)")
    return list(target_modules)


def adapted_modules(family: ModelFamily, leaves: list[str], removed: list[str]) -> list[str]:
    """Full names of the ``leaves`` linear layers in the kept layers of the stacks that lost units
    (``enc`` when only encoder layers were removed); call it with the prune set applied."""
    cut = {unit_stack(u) for u in removed}
    names = {id(m): n for n, m in family.model.named_modules()}
    out = []
    for s in family.stacks:
        if s.prefix not in cut:
            continue
        for layer in s.layers:
            out += [f"{names[id(layer)]}.{n}" for n, m in layer.named_modules()
                    if isinstance(m, nn.Linear) and n.split(".")[-1] in leaves]
    return out


def peft_config(family: ModelFamily, lora: dict, removed: list[str] = ()):
    """The LoRA config; with ``lora.stacks: pruned`` (and a prune set applied) only the stacks that lost
    layers get adapters, else every layer of every stack."""
    from peft import LoraConfig, TaskType

    task = TaskType.CAUSAL_LM if family.causal else TaskType.SEQ_2_SEQ_LM
    targets = resolve_targets(family, lora["target_modules"])
    if lora.get("stacks", "all") == "pruned" and removed:
        targets = adapted_modules(family, targets, list(removed))
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
                      modules_to_save=lora.get("modules_to_save") or None, task_type=task)


# ----------------------------------------------------------------------------- intermediate-layer matching
def matched_layers(layer_counts: dict[str, int], removed: list[str], at: str = "cut") -> list[tuple[str, int, int]]:
    """``(stack, student layer, teacher layer)`` whose outputs ``train.layer_kd`` matches, for stacks of
    ``layer_counts`` layers without ``removed``. ``cut``: the first kept layer after each removed block
    (it must now produce what the removed layers and itself produced) and, when a stack's top layers went,
    its last kept layer against the teacher's top layer; ``kept``: every kept layer (the last against the top)."""
    cut = {(u.stack, u.layer) for u in map(parse_unit, removed)}
    out = []
    for prefix, count in layer_counts.items():
        kept = [i for i in range(count) if (prefix, i) not in cut]
        if not kept or len(kept) == count:
            continue
        if at == "kept":
            chosen = set(kept)
        else:
            chosen = {i for i in kept if (prefix, i - 1) in cut}
            if (prefix, count - 1) in cut:
                chosen.add(kept[-1])
        out += [(prefix, kept.index(i), count - 1 if i == kept[-1] else i) for i in sorted(chosen)]
    return out


def matched_modules(student: ModelFamily, teacher: ModelFamily, removed: list[str],
                    at: str = "cut") -> list[tuple[str, nn.Module, nn.Module]]:
    """The layer modules of :func:`matched_layers`: ``student`` has ``removed`` applied, ``teacher`` is whole."""
    counts = {s.prefix: len(s.layers) for s in teacher.stacks}
    s_stacks, t_stacks = {s.prefix: s.layers for s in student.stacks}, {s.prefix: s.layers for s in teacher.stacks}
    return [(p, s_stacks[p][i], t_stacks[p][j]) for p, i, j in matched_layers(counts, removed, at)]


@contextmanager
def layer_outputs(modules: list[nn.Module]) -> Iterator[list]:
    """Inside the context, the list holds each module's last output (its hidden states)."""
    outs: list = [None] * len(modules)

    def hook(i):
        return lambda _m, _a, out: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- data
def encode(family: ModelFamily, pairs: list[tuple[str, str, str, str]], max_len: int) -> list[Example]:
    """Token ids of ``(src_lang, tgt_lang, source, target)`` pairs for teacher-forced training;
    pairs longer than ``max_len`` tokens on either side are skipped."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for s, t, src, tgt in pairs:
        groups.setdefault((s, t), []).append((src, tgt))
    out: list[Example] = []
    for (s, t), items in groups.items():
        out += family.training_examples(s, t, [x[0] for x in items], [x[1] for x in items], max_len)
    return out


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` (-100 on padding)."""
    w_in = max(len(e[0]) for e in examples)
    w_lab = max(len(e[1]) for e in examples)
    ids = torch.tensor([e[0] + [pad_id] * (w_in - len(e[0])) for e in examples])
    mask = torch.tensor([[1] * len(e[0]) + [0] * (w_in - len(e[0])) for e in examples])
    labels = torch.tensor([e[1] + [-100] * (w_lab - len(e[1])) for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def epoch_batches(examples: list[Example], batch_size: int, world: int, epoch: int, seed: int) -> list[list[int]]:
    """Length-bucketed batches of ``batch_size`` example indices, shuffled per epoch; a multiple of
    ``world`` of them (so every worker takes the same number of steps)."""
    rng = random.Random(f"{seed}:{epoch}")
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    idx.sort(key=lambda i: (len(examples[i][0]), len(examples[i][1])))
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches[: len(batches) // world * world]


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to 10% of the peak at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (1.0 - 0.9 * min(1.0, (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def _loss_sum(model: nn.Module, examples: list[Example], pad_id: int, device, batch_size: int = 32,
              loss: Callable[[dict], torch.Tensor] | None = None) -> tuple[float, int]:
    """A per-token loss summed over the target tokens, and their count: the model's own cross-entropy,
    or ``loss(batch)`` (a token mean, e.g. the KL to the teacher)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        n = int((batch["labels"] != -100).sum())  # a causal LM's first label is a prompt token (-100)
        total += float(loss(batch) if loss else model(**batch).loss) * n
        count += n
    return total, count


def set_training(model: nn.Module, model_dropout: bool) -> None:
    """Training mode for the adapters. Unless ``model_dropout``, the frozen model's own dropout stays off:
    the student then matches the deterministic teacher it is distilled from, instead of a noisy copy of
    itself (on the demo, 375 steps close 56% of the held-out KL to the teacher with it off, 11% with it on)."""
    model.train(model_dropout)
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            module.train()


def validate(family: ModelFamily, val: list[dict], rank: int, world: int, scorer, decoding: Decoding,
             max_len: int, primary: str, teacher: nn.Module | None = None) -> dict:
    """Dev-set metrics of the model as it is now; each worker takes a share of the directions. With the
    ``teacher`` loaded also ``val_kl``: the token-level KL to it on its own translations of the dev sources
    (what distillation minimises; the decoded score on a few dev sentences is too noisy to steer by)."""
    import torch.distributed as dist

    model = family.model
    modes = {m: m.training for m in model.modules()}
    model.eval()
    pad = family.tokenizer.pad_token_id
    mine = {}
    for group in val[rank::world]:
        s, t = group["src_lang"], group["tgt_lang"]
        hyps = family.translate(list(group["sources"]), s, t, decoding)
        scores = scorer.score(hyps, list(group["references"]))
        refs = encode(family, [(s, t, a, b) for a, b in zip(group["sources"], group["references"])], max_len)
        kd = encode(family, [(s, t, a, b) for a, b in zip(group["sources"], group["teacher"]) if b.strip()], max_len)
        mine[f"{s}-{t}"] = {"scores": scores, "ref": _loss_sum(model, refs, pad, family.device),
                            "kd": _loss_sum(model, kd, pad, family.device)}
        if teacher is not None:
            mine[f"{s}-{t}"]["kl"] = _loss_sum(model, kd, pad, family.device,
                                               loss=lambda b: training_loss(model, family, teacher, b, word_kd=1.0))
    for m, mode in modes.items():
        m.train(mode)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    per = {d: v for p in parts for d, v in p.items()}
    out = {f"val_{primary}": round(sum(v["scores"][primary] for v in per.values()) / max(len(per), 1), 4)}
    for m in next(iter(per.values()))["scores"] if per else []:
        out[f"val_{m}"] = round(sum(v["scores"][m] for v in per.values()) / len(per), 4)
    for kind, key in (("ref", "val_ref_loss"), ("kd", "val_kd_loss"), ("kl", "val_kl")):
        if all(kind in v for v in per.values()):
            tot, cnt = sum(v[kind][0] for v in per.values()), sum(v[kind][1] for v in per.values())
            out[key] = round(tot / max(cnt, 1), 6)
    out["val_directions"] = {d: v["scores"][primary] for d, v in sorted(per.items())}
    return out


# ----------------------------------------------------------------------------- the training loop
def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..families import load_family
    from ..metrics import Scorer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, config["threads"]))
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()
    spec = ModelConfig(**{**config["spec"], "device": str(device)})
    family = load_family(spec)
    data = ray.get(config["data"])
    scorer = Scorer(spm=config["spm"], metrics=tuple(config["metrics"]))
    decoding = Decoding(**config["decoding"])
    t = config["train"]

    with family.apply(config["removed"]):
        model = get_peft_model(family.model, peft_config(family, config["lora"], config["removed"]))
        examples = encode(family, [(p["src_lang"], p["tgt_lang"], p["source"], p["target"]) for p in data["train"]],
                          t["max_len"])
        if not examples:
            raise ValueError("no training pairs fit train.max_len; raise it or check the corpus")
        teacher, layers = None, []
        if needs_teacher(t):  # the unpruned model, for token-level KL / hidden states / validation KL
            teacher_family = load_family(spec)
            teacher = teacher_family.model.eval().requires_grad_(False)
            if t.get("layer_kd"):
                layers = matched_modules(family, teacher_family, config["removed"], t.get("layer_kd_at", "cut"))
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        steps_per_epoch = len(epoch_batches(examples, t["batch_size"], world, 0, t["seed"])) // world
        if steps_per_epoch == 0:
            raise ValueError(f"{len(examples)} training pairs make no batch of train.batch_size={t['batch_size']} "
                             f"for each of {world} workers; lower the batch size or add data")
        total = max(1, math.ceil(t["epochs"] * steps_per_epoch))
        if t.get("max_steps"):
            total = min(total, t["max_steps"])
        state = {"step": 0, "epoch": 0, "batch": 0, "history": [], "restarts": 0, "seconds": 0.0,
                 "examples": len(examples), "steps_per_epoch": steps_per_epoch, "total_steps": total,
                 "trainable_params": sum(p.numel() for p in params), "resumed_from": []}
        select = t.get("select", "last")
        best: dict[str, torch.Tensor] | None = None  # the adapter with the lowest validation KL so far (select: val_kl)
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                set_peft_model_state_dict(model, load_file(str(Path(d) / "adapter" / "adapter_model.safetensors")))
                optim.load_state_dict(torch.load(Path(d) / "optimizer.pt", map_location=device, weights_only=True))
                state = json.loads((Path(d) / "state.json").read_text())
                if (Path(d) / BEST / "adapter_model.safetensors").is_file():
                    best = load_file(str(Path(d) / BEST / "adapter_model.safetensors"))
            state["restarts"] += 1
            state["resumed_from"].append(state["step"])
            if rank == 0:
                print(f"[cullmt-ray heal] resumed from the checkpoint at step {state['step']}", flush=True)
        ddp = ray.train.torch.prepare_model(model)
        set_training(model, t["model_dropout"])
        t0 = time.time()
        seconds0 = state["seconds"]

        def metrics_now(extra: dict) -> dict:
            return {"step": state["step"], "epoch": state["epoch"], "restarts": state["restarts"], "workers": world,
                    "seconds": round(seconds0 + time.time() - t0, 2), **extra}

        def keep_if_best(m: dict) -> None:
            nonlocal best
            if select == "val_kl" and "val_kl" in m and m["val_kl"] < state.get("best", {}).get("val_kl", math.inf):
                best = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
                state["best"] = {"step": m["step"], "val_kl": m["val_kl"]}

        if ckpt is None and data["val"]:
            m = metrics_now(validate(family, data["val"], rank, world, scorer, decoding, t["max_len"],
                                     config["primary"], teacher))
            state["history"].append(m)
            keep_if_best(m)
            ray.train.report(m)
        loss_sum, loss_n = 0.0, 0
        fault = config.get("fault") or {}
        while state["step"] < total:
            batches = epoch_batches(examples, t["batch_size"], world, state["epoch"], t["seed"])[rank::world]
            for b in batches[state["batch"] :]:
                for g in optim.param_groups:
                    g["lr"] = lr_at(state["step"], t["lr"], t["warmup"], total)
                batch = collate([examples[i] for i in b], family.tokenizer.pad_token_id, device)
                loss = training_loss(ddp, family, teacher, batch, t["label_smoothing"], t["word_kd"], t["hidden_kd"],
                                     t.get("layer_kd", 0.0), layers)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, t["clip"])
                optim.step()
                optim.zero_grad(set_to_none=True)
                state["step"] += 1
                state["batch"] += 1
                loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
                if fault and state["step"] == fault.get("step") and rank == fault.get("rank", 0) \
                        and os.path.exists(fault["file"]):
                    os.remove(fault["file"])
                    # die only once the last checkpoint is registered: Ray Train takes reports in on its
                    # health-check poll (2 s), and a report still queued when the group fails is lost
                    ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED,
                                                           timeout_s=60)
                    print(f"[cullmt-ray heal] injected fault: worker {rank} exits at step {state['step']}", flush=True)
                    os._exit(1)
                done = state["step"] >= total
                do_eval = done or (t["eval_every"] and state["step"] % t["eval_every"] == 0)
                do_ckpt = done or state["step"] % t["checkpoint_every"] == 0
                do_eval = do_eval or (do_ckpt and select == "val_kl")  # the best so far is known at every checkpoint
                if not (do_eval or do_ckpt):
                    continue
                avg = torch.tensor([loss_sum, loss_n], dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(avg)
                extra = {"train_loss": round(float(avg[0] / max(avg[1], 1)), 5),
                         "lr": optim.param_groups[0]["lr"]}
                loss_sum, loss_n = 0.0, 0
                if do_eval and data["val"]:
                    extra.update(validate(family, data["val"], rank, world, scorer, decoding, t["max_len"],
                                          config["primary"], teacher))
                m = metrics_now(extra)
                state["history"].append(m)
                keep_if_best(m)
                state["seconds"] = m["seconds"]
                if do_ckpt:
                    with tempfile.TemporaryDirectory() as tmp:
                        checkpoint = None
                        if rank == 0:
                            model.save_pretrained(str(Path(tmp) / "adapter"))
                            if best is not None:
                                save_best(best, Path(tmp) / "adapter", Path(tmp) / BEST)
                            torch.save(optim.state_dict(), Path(tmp) / "optimizer.pt")
                            (Path(tmp) / "state.json").write_text(json.dumps(state))
                            checkpoint = ray.train.Checkpoint.from_directory(tmp)
                        ray.train.report(m, checkpoint=checkpoint)
                else:
                    ray.train.report(m)
                if done:
                    break
            else:
                state["epoch"] += 1
                state["batch"] = 0


BEST = "best_adapter"  # checkpoint subfolder: the adapter with the lowest validation KL (train.select: val_kl)


def needs_teacher(train: dict) -> bool:
    """Whether training loads the unpruned model: for a KD loss term or to select by validation KL."""
    return bool(train["word_kd"] or train["hidden_kd"] or train.get("layer_kd") or train.get("select") == "val_kl")


def save_best(weights: dict[str, torch.Tensor], adapter_dir: Path, out: Path) -> None:
    """``weights`` as a peft adapter folder beside ``adapter_dir`` (whose config it shares)."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(adapter_dir / "adapter_config.json", out / "adapter_config.json")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "adapter_model.safetensors"))


def chosen_adapter(checkpoint_dir: str | Path) -> Path:
    """The adapter to export from a checkpoint: the best by validation KL when kept, else the last."""
    d = Path(checkpoint_dir)
    return d / BEST if (d / BEST / "adapter_model.safetensors").is_file() else d / "adapter"


def _decoder_inputs(family: ModelFamily, labels: torch.Tensor) -> torch.Tensor:
    pad = family.tokenizer.pad_token_id
    out = labels.new_full(labels.shape, pad)
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
    out[:, 0] = family.model.config.decoder_start_token_id
    return out


def training_loss(model: nn.Module, family: ModelFamily, teacher: nn.Module | None, batch: dict,
                  label_smoothing: float = 0.0, word_kd: float = 0.0, hidden_kd: float = 0.0, layer_kd: float = 0.0,
                  layers: list[tuple[str, nn.Module, nn.Module]] = ()) -> torch.Tensor:
    """Cross-entropy on the targets (label-smoothed if asked; the targets are the teacher's translations
    for sequence-level KD), mixed with ``word_kd`` x the token-level KL(teacher || student) over the
    same target positions (word-level KD, Kim & Rush 2016), plus ``hidden_kd`` x the relative squared
    error between the student's and the teacher's hidden states (:meth:`ModelFamily.kd_hidden`) over the
    input tokens, plus ``layer_kd`` x the mean relative squared error between the outputs of matched
    ``(stack, student layer, teacher layer)`` modules (:func:`matched_modules`; over
    :meth:`ModelFamily.kd_positions`): a direct signal for the layers next to a removed one."""
    layer_kd = layer_kd if layers else 0.0
    if not label_smoothing and not word_kd and not hidden_kd and not layer_kd:
        return model(**batch).loss
    shift = family.causal  # causal LMs shift labels inside forward: one fewer predicted token per row
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not shift:
        inputs["decoder_input_ids"] = _decoder_inputs(family, labels)
    if hidden_kd and shift:
        inputs["output_hidden_states"] = True
    with layer_outputs([m for _, m, _ in layers] if layer_kd else []) as s_layers:
        out = model(**inputs)
    logits = out.logits.float()
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = torch.zeros((), device=logits.device)
    if word_kd < 1:
        loss = (1 - word_kd) * nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                           ignore_index=-100, label_smoothing=label_smoothing)
    if not (word_kd or hidden_kd or layer_kd):
        return loss
    with torch.no_grad(), layer_outputs([m for _, _, m in layers] if layer_kd else []) as t_layers:
        t_out = teacher(**inputs)
    if word_kd:
        lp_t = (t_out.logits[:, :-1] if shift else t_out.logits).float().log_softmax(-1)
        mask = labels != -100
        kl = (lp_t.exp() * (lp_t - logits.log_softmax(-1))).sum(-1)[mask].mean()
        loss = loss + word_kd * kl
    if hidden_kd:
        real = batch["attention_mask"].bool()
        h_s, h_t = family.kd_hidden(out).float()[real], family.kd_hidden(t_out).float()[real]
        loss = loss + hidden_kd * ((h_s - h_t) ** 2).sum() / (h_t**2).sum().clamp_min(1e-6)
    if layer_kd:
        terms = []
        for (prefix, _, _), h_s, h_t in zip(layers, s_layers, t_layers):
            where = family.kd_positions(prefix, batch)
            h_s, h_t = h_s.float()[where], h_t.float()[where]
            terms.append(((h_s - h_t) ** 2).sum() / (h_t**2).sum().clamp_min(1e-6))
        loss = loss + layer_kd * torch.stack(terms).mean()
    return loss


# ----------------------------------------------------------------------------- the driver side
@dataclass
class TrainOutcome:
    checkpoint: object  # the last ray.train.Checkpoint (``.path``, ``.as_directory()``)
    metrics: dict  # the last reported metrics
    history: list[dict]  # every report: step, train loss, validation
    state: dict  # the loop state saved with the last checkpoint
    seconds: float  # wall time of fit()
    started: float = 0.0  # time.time() when fit() started and ended
    finished: float = 0.0


def train_lora(spec: ModelConfig, removed: list[str], train_pairs: list[dict], val_groups: list[dict],
               settings: dict, storage_path: str, name: str, fault: dict | None = None,
               log: Callable[[str], None] = print) -> TrainOutcome:
    """Fine-tune LoRA adapters of the model without ``removed`` on ``train_pairs`` with Ray Train.

    ``settings`` holds ``train``/``lora``/``resources`` (as in :class:`~cullmt_ray.heal.config.HealConfig`)
    and ``spm``/``metrics``/``primary``/``decoding`` for validation. A run stored under
    ``storage_path/name`` resumes from its last checkpoint (after a worker failure, and when the
    same heal is started again). ``fault`` (tests only) makes one worker exit once.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t, res = settings["train"], settings["resources"]
    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpw = res.get("gpus_per_worker")
    gpw = (1.0 if gpus >= 1 else 0.0) if gpw is None else gpw
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": gpw} if gpw else {})}
    data_ref = ray.put({"train": train_pairs, "val": val_groups})
    config = {"spec": asdict(spec), "removed": list(removed), "data": data_ref, "train": t, "lora": settings["lora"],
              "spm": settings["spm"], "metrics": settings["metrics"], "primary": settings["primary"],
              "decoding": settings["decoding"], "threads": max(1, int(res["cpus_per_worker"])),
              "seed": t["seed"], "fault": fault}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=bool(gpw), resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=t["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=t["keep_checkpoints"])))
    t0 = time.time()
    result = trainer.fit()
    seconds = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"healing {name}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
    return TrainOutcome(result.checkpoint, dict(result.metrics or {}), state["history"], state, seconds, t0, t0 + seconds)
