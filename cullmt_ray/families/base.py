"""One small interface per model family: units, apply a prune set, size, translate, export.

A family never copies weights to make a candidate: ``apply`` re-slices the layer
``ModuleList``s, renumbers every remaining layer's ``layer_idx`` (the KV cache indexes by
it) and updates the config's layer counts; leaving the context restores all of it.
"""

from __future__ import annotations

import os

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch
from torch import nn

from ..config import Decoding
from ..model_files import FamilyError, config_units
from ..units import empties_a_group, sort_units


@dataclass(frozen=True)
class Size:
    """Size of a (pruned) model: parameters and bytes at the loaded dtype."""

    params: int
    bytes: int


@dataclass
class LayerStack:
    """A prunable ``ModuleList``: unit ids are ``{prefix}.{i}``."""

    prefix: str
    owner: nn.Module  # the module whose attribute ``attr`` is the ModuleList
    attr: str
    count_fields: tuple[str, ...]  # config fields holding the layer count
    list_fields: tuple[str, ...] = ()  # per-layer config lists sliced along (e.g. layer_types)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.owner, self.attr)


class TensorCache:
    """A least-recently-used map to tensors (or model outputs holding tensors), bounded in MiB."""

    def __init__(self, mib: float):
        from collections import OrderedDict

        self.limit = int(mib * 2**20)
        self.items: OrderedDict = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def _size(value) -> int:
        values = value.values() if hasattr(value, "values") else value if isinstance(value, (tuple, list)) else [value]
        return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))

    def get(self, key, make):
        """The value for ``key``; on a miss ``make()`` computes it (kept if it fits)."""
        if (hit := self.find(key)) is not None:
            return hit
        self.misses += 1
        value = make()
        self.put(key, value)
        return value

    def find(self, key):
        """The value for ``key`` (now the most recently used), or None."""
        if key not in self.items:
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return self.items[key][0]

    def put(self, key, value) -> None:
        """Keep ``value`` for ``key`` if it fits, dropping the least recently used beyond the limit."""
        size = self._size(value)
        if size > self.limit or key in self.items:
            return
        self.items[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.limit:
            _, (_, s) = self.items.popitem(last=False)
            self.nbytes -= s

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = self.hits = self.misses = 0


Example = tuple[list[int], list[int]]  # (input ids, labels with -100 where no loss)


class ModelFamily(ABC):
    """A loaded model plus what is needed to prune, size, run, train and save it.

    Everything that differs between families (unit names, prompts, the training encoding, the
    hidden state healing matches, how a saved model is loaded) lives here, not in its callers.
    """

    name: ClassVar[str] = "base"
    causal: ClassVar[bool] = False  # decoder-only: labels are shifted inside the model (peft task CAUSAL_LM)

    def __init__(self, model: nn.Module, tokenizer, model_id: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.stacks = self._stacks()
        self._unit_params = self._count_unit_params()
        self._applied = False
        self.removed: frozenset[str] = frozenset()  # the prune set applied now (see apply)

    # --------------------------------------------------------------- what a family defines
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this family can handle ``model``."""

    @abstractmethod
    def _stacks(self) -> list[LayerStack]:
        """The model's prunable layer stacks."""

    @classmethod
    def config_units(cls, config) -> list[str]:
        """The units of a model with this ``config.json`` (read on the driver, without weights:
        :func:`cullmt_ray.model_files.config_units`)."""
        return config_units(cls.name, config)

    @abstractmethod
    def training_examples(self, src: str, tgt: str, sources: list[str], targets: list[str],
                          max_len: int) -> list[Example]:
        """Token ids of teacher-forced training pairs; pairs over ``max_len`` tokens are skipped."""

    @abstractmethod
    def kd_hidden(self, out) -> torch.Tensor:
        """The representation healing matches to the unpruned model's (``train.hidden_kd``)."""

    def kd_positions(self, prefix: str, batch: dict) -> torch.Tensor:
        """Where the layers of stack ``prefix`` see real tokens in a training ``batch`` (bool, batch x length)."""
        return batch["attention_mask"].bool()

    @abstractmethod
    def _generate(self, sources: list[str], src: str, tgt: str, decoding: Decoding) -> list[str]:
        """Translate one plain batch (already length-sorted) from ``src`` to ``tgt`` (NLLB codes) with
        ``generate``, the batch's own limit of new tokens."""

    def _greedy_rows(self, rows: list[tuple[str, str, str]], decoding: Decoding, limits: list[int]) -> list[str]:
        """Translate one batch of ``(source, src, tgt)`` rows, directions mixed, with the greedy loop; row ``i``
        may generate ``limits[i]`` new tokens. Only called where :meth:`rows_exact` holds for every row."""
        raise NotImplementedError

    def _greedy_rows_group(self, rows: list[tuple[str, str, str]], decoding: Decoding, limits: list[int],
                           sets: list[frozenset[str]]) -> list[list[str]]:
        """:meth:`_greedy_rows` for each prune set of ``sets`` at once, in lockstep (families with ``lockstep``)."""
        raise NotImplementedError

    # --------------------------------------------------------------- units and sizes
    def units(self) -> list[str]:
        """All prunable unit ids, e.g. ``enc.0 ... dec.5`` or ``layer.0 ...``."""
        return [f"{s.prefix}.{i}" for s in self.stacks for i in range(len(s.layers))]

    def check_units(self, removed: Iterable[str]) -> frozenset[str]:
        """``removed`` as a set, when every unit is this model's and no stack (MoE layer) is left empty."""
        removed = frozenset(removed)
        units = self.units()
        bad = sort_units(removed - set(units))
        if bad:
            what = "a unit" if "expert" not in bad[0] else "an expert"
            raise FamilyError(f"unit {bad[0]!r} is not {what} of this model; its units are {units[0]} .. {units[-1]}")
        group = empties_a_group(units, removed)
        if group:
            what = "expert" if "." in group else "layer"
            raise FamilyError(f"prune set removes every {what} of '{group}'; keep at least one")
        return removed

    def _count_unit_params(self) -> dict[str, tuple[int, int]]:
        out = {}
        for s in self.stacks:
            for i, layer in enumerate(s.layers):
                ps = list(layer.parameters())
                out[f"{s.prefix}.{i}"] = (sum(p.numel() for p in ps),
                                          sum(p.numel() * p.element_size() for p in ps))
        return out

    def size(self, removed: Iterable[str] = ()) -> Size:
        """Parameters and bytes of the model with ``removed`` units taken out."""
        seen, params, nbytes = set(), 0, 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
                nbytes += p.numel() * p.element_size()
        for u in self.check_units(removed):
            params -= self._unit_params[u][0]
            nbytes -= self._unit_params[u][1]
        return Size(params, nbytes)

    # --------------------------------------------------------------- pruning
    @contextmanager
    def apply(self, removed: Iterable[str]) -> Iterator[nn.Module]:
        """Within the context the model lacks ``removed`` units; weights are shared, never copied."""
        removed = self.check_units(removed)
        saved = []
        config = self.model.config
        try:
            self._enter()
            self.removed = removed
            for s in self.stacks:
                full = s.layers
                keep = [i for i in range(len(full)) if f"{s.prefix}.{i}" not in removed]
                fields = {f: getattr(config, f) for f in s.count_fields + s.list_fields}
                idx = [(m, m.layer_idx) for layer in full for m in layer.modules() if hasattr(m, "layer_idx")]
                saved.append((s, full, fields, idx))
                setattr(s.owner, s.attr, nn.ModuleList([full[i] for i in keep]))
                for new, i in enumerate(keep):
                    for m in full[i].modules():
                        if hasattr(m, "layer_idx"):
                            m.layer_idx = new
                for f in s.count_fields:
                    setattr(config, f, len(keep))
                for f in s.list_fields:
                    if fields[f] is not None:
                        setattr(config, f, [fields[f][i] for i in keep])
            yield self.model
        finally:
            for s, full, fields, idx in reversed(saved):
                setattr(s.owner, s.attr, full)
                for f, v in fields.items():
                    setattr(config, f, v)
                for m, v in idx:
                    m.layer_idx = v
            self._applied = False
            self.removed = frozenset()

    def _enter(self) -> None:
        """Mark a prune set applied; they do not nest."""
        if self._applied:
            raise FamilyError("a prune set is already applied; prune sets do not nest")
        self._applied = True

    # --------------------------------------------------------------- states kept across prune sets
    def keep_states(self) -> None:
        """Reuse computed states across prune sets (the full encoder's output, states at layer boundaries):
        for a replica whose weights never change, an evaluator actor. Off by default: they are not keyed by the
        weights, so a model being trained or merged would read stale ones."""

    # --------------------------------------------------------------- translation
    # Sentences decoded together by the greedy loop when rows are exact (see ``translate``): as many
    # length-sorted sources as fit in this many padded source tokens, at most ``decode_rows``.
    decode_tokens: ClassVar[int] = 4096
    decode_rows: ClassVar[int] = 256
    # Prune sets decoded together by translate_group (a family with a lockstep loop), at most this many rows a batch.
    lockstep: ClassVar[bool] = False
    lockstep_rows: ClassVar[int] = 2048
    # Devices the greedy loop runs on (families with one; ``fast_greedy`` turns it off): where its outputs were
    # verified equal to generate's whatever the batch (fp32 on CPU). Elsewhere, e.g. bf16 on a GPU, a batch's
    # shape can change the kernels and so the numbers: generate decodes there until that is measured.
    greedy_devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def _greedy_here(self) -> bool:
        """Whether the greedy loop may run on this replica: fp32 on a device of ``greedy_devices``, and not
        turned off with ``CULLMT_GREEDY_LOOP=0`` (HF ``generate`` then: the same outputs, slower)."""
        return (os.environ.get("CULLMT_GREEDY_LOOP", "1") != "0" and self.device.type in self.greedy_devices
                and self.model.dtype == torch.float32)

    @torch.inference_mode()
    def translate(self, sources: list[str], src: str, tgt: str, decoding: Decoding = Decoding(),
                  limits: list[int] | None = None) -> list[str]:
        """Batched, length-sorted translation; outputs come back in input order.

        A sentence may generate up to ``min(max_new_tokens, 2 * L + 10)`` tokens, ``L`` the longest source
        of its batch when the sources are cut, longest first, into batches of ``decoding.batch_size``
        (:meth:`token_limits`; ``limits`` gives them instead, one per source). Where the greedy loop applies
        and rows are exact (:meth:`rows_exact`), see :meth:`translate_many`; otherwise the plain batches run
        ``generate``.
        """
        if not sources:
            return []
        if self.rows_exact(src, tgt, decoding):
            return self.translate_many([(sources, src, tgt)], decoding, [limits])[0]
        if limits is not None:
            raise FamilyError("per-sentence token limits need exact rows (greedy loop, CPU)")
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
        out: list[str] = [""] * len(sources)
        for b in range(0, len(order), decoding.batch_size):
            idx = order[b : b + decoding.batch_size]
            for i, hyp in zip(idx, self._generate([sources[i] for i in idx], src, tgt, decoding)):
                out[i] = hyp.strip()
        return out

    @torch.inference_mode()
    def translate_many(self, jobs: list[tuple[list[str], str, str]], decoding: Decoding = Decoding(),
                       limits: list[list[int] | None] | None = None) -> list[list[str]]:
        """Translate several ``(sources, src, tgt)`` jobs (e.g. every direction of a candidate); one list of
        hypotheses per job, in input order.

        Where every job's rows are exact (:meth:`rows_exact`: a row's tokens do not depend on the rows it is
        decoded with), the rows of all jobs are pooled, sorted by source tokens and decoded together in batches
        formed by tokens (``decode_tokens`` padded source tokens, at most ``decode_rows`` rows), each row with
        its own token limit (its job's :meth:`token_limits`, or ``limits[j]``): the outputs of translating
        each job alone, in fewer, fuller batches. Otherwise each job runs :meth:`translate`.
        """
        limits = limits or [None] * len(jobs)
        if not all(self.rows_exact(src, tgt, decoding) for _, src, tgt in jobs):
            return [self.translate(sources, src, tgt, decoding, lim) for (sources, src, tgt), lim in zip(jobs, limits)]
        out = [[""] * len(sources) for sources, _, _ in jobs]
        for b in self._row_batches(jobs, decoding, limits):
            rows = [(jobs[j][0][i], jobs[j][1], jobs[j][2]) for _, j, i, _ in b]
            for (_, j, i, _), hyp in zip(b, self._greedy_rows(rows, decoding, [r[3] for r in b])):
                out[j][i] = hyp.strip()
        return out

    @torch.inference_mode()
    def translate_group(self, removed_sets: list[Iterable[str]], jobs: list[tuple[list[str], str, str]],
                        decoding: Decoding = Decoding(), limits: list[list[int] | None] | None = None
                        ) -> list[list[list[str]]]:
        """:meth:`translate_many` of ``jobs`` for each prune set of ``removed_sets`` (none applied now): per prune set, one
        list of hypotheses per job. A family with a lockstep loop (``lockstep``) decodes the prune sets together
        where rows are exact: each batch of sentences holds the rows of several prune sets, and each layer computes
        the rows of the prune sets that keep it (at most ``lockstep_rows`` rows a batch), so the batches are fuller
        and their per-step cost is paid once; the same outputs as one prune set after another, which the others do."""
        sets = [self.check_units(r) for r in removed_sets]
        limits = limits or [None] * len(jobs)
        if len(sets) < 2 or not self.lockstep or not all(self.rows_exact(src, tgt, decoding) for _, src, tgt in jobs):
            out = []
            for r in sets:
                with self.apply(r):
                    out.append(self.translate_many(jobs, decoding, limits))
            return out
        out = [[[""] * len(sources) for sources, _, _ in jobs] for _ in sets]
        for b in self._row_batches(jobs, decoding, limits):
            rows = [(jobs[j][0][i], jobs[j][1], jobs[j][2]) for _, j, i, _ in b]
            per = max(1, self.lockstep_rows // len(b))
            for first in range(0, len(sets), per):
                group = sets[first : first + per]
                for k, hyps in enumerate(self._greedy_rows_group(rows, decoding, [r[3] for r in b], group)):
                    for (_, j, i, _), hyp in zip(b, hyps):
                        out[first + k][j][i] = hyp.strip()
        return out

    def _row_batches(self, jobs: list[tuple[list[str], str, str]], decoding: Decoding,
                     limits: list[list[int] | None]) -> list[list[tuple[int, int, int, int]]]:
        """The rows of all jobs, ``(source tokens, job, sentence, token limit)``, sorted by source tokens (longest
        first) and cut into batches of at most ``decode_tokens`` padded source tokens and ``decode_rows`` rows."""
        pool: list[tuple[int, int, int, int]] = []  # (source tokens, job, sentence, token limit)
        for j, (sources, src, tgt) in enumerate(jobs):
            lengths = self._limit_lengths(sources, src, tgt) if sources else []
            lim = limits[j] if limits[j] is not None else self.token_limits(sources, lengths, decoding)
            pool += [(lengths[i], j, i, lim[i]) for i in range(len(sources))]
        pool.sort(key=lambda r: -r[0])
        batches: list[list[tuple[int, int, int, int]]] = []
        for row in pool:
            b = batches[-1] if batches else None
            # sorted longest first: the batch's first row is its longest
            if b is None or len(b) + 1 > self.decode_rows or (len(b) + 1) * b[0][0] > self.decode_tokens:
                batches.append([row])
            else:
                b.append(row)
        return batches

    @staticmethod
    def token_limits(sources: list[str], lengths: list[int], decoding: Decoding) -> list[int]:
        """Each sentence's limit of new tokens, from the source lengths (:meth:`_limit_lengths`):
        ``min(max_new_tokens, 2 * L + 10)``, ``L`` the longest of its plain batch (sorted by characters, longest
        first, ``decoding.batch_size`` each), as ``generate`` decodes them."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
        limits = [0] * len(sources)
        for b in range(0, len(order), decoding.batch_size):
            idx = order[b : b + decoding.batch_size]
            limit = min(decoding.max_new_tokens, 2 * max(lengths[i] for i in idx) + 10)
            for i in idx:
                limits[i] = limit
        return limits

    def rows_exact(self, src: str, tgt: str, decoding: Decoding) -> bool:
        """Whether this family decodes with the greedy loop, whose row's tokens do not depend on the rows it is
        decoded with (``greedy_devices``; tests/test_speed_paths.py, bench/bench_speed.py part ``candidate``)."""
        return False

    def _limit_lengths(self, sources: list[str], src: str, tgt: str) -> list[int]:
        """Per-source token lengths the token limit is computed from."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --------------------------------------------------------------- export
    def export(self, removed: Iterable[str], out_dir: str | Path, card: dict | None = None) -> Path:
        """Save the pruned model + tokenizer + card so plain ``from_pretrained`` loads it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        removed = sort_units(self.check_units(removed))
        dtype = self.save_dtype()
        with self.apply(removed) as model:
            cast: dict[tuple, torch.Tensor] = {}  # tied weights stay one tensor
            state = {k: cast.setdefault((v.data_ptr(), v.shape), v.to(dtype)) for k, v in model.state_dict().items()}
            model.save_pretrained(out, safe_serialization=True, state_dict=state)
        import json

        from ..atomic import honour_umask, write_json

        conf = json.loads((out / "config.json").read_text())  # it names the loaded dtype, not the saved one
        conf["dtype"] = str(dtype).removeprefix("torch.")
        write_json(out / "config.json", conf)
        self.tokenizer.save_pretrained(out)
        self.write_card(out, removed, card)
        honour_umask(out)
        return out

    def save_dtype(self) -> torch.dtype:
        """The dtype an export is saved at: the one the base model is stored in (not the loaded fp32 on CPU)."""
        from . import SAVE_DTYPES, stored_dtype

        return SAVE_DTYPES[stored_dtype(self.model_id)]

    def write_card(self, out: Path, removed: list[str], facts: dict | None) -> None:
        """The pruned model's card (README.md) and facts (cullmt_ray.json)."""
        from ..card import pruned_card, write_card

        dtype = self.save_dtype()
        size = self.size(removed).__dict__.copy()
        size["bytes"] = size["params"] * dtype.itemsize
        info = {"base_model": self.model_id, "family": self.name, "causal": self.causal, "removed_units": removed,
                "size": size, "dtype": str(dtype).removeprefix("torch."),
                "tokenizer_src_lang": getattr(self.tokenizer, "src_lang", None),
                "model_dir": str(out), **(facts or {})}
        write_card(out, info, pruned_card(info))
