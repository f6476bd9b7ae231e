"""Healing: KD data via the evaluator actors, LoRA with Ray Train (2 CPU workers), resume after a
killed worker, merged export that plain transformers loads, candidate selection and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cullmt_ray.candidate import Candidate
from cullmt_ray.data import load_devset
from cullmt_ray.config import Decoding, ModelConfig
from cullmt_ray.families import load_family

REMOVED = ["dec.1"]  # a real (non-identity) layer of the tiny model
SHORT = Decoding(max_new_tokens=16, batch_size=16)


@pytest.fixture(scope="module")
def kd_pairs(tiny_encdec):
    """Teacher (unpruned tiny model) translations of demo sentences, both ways: 48 train pairs, 8 val per direction."""
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"])
    fam = load_family(ModelConfig(str(tiny_encdec)))
    train, val = [], []
    for s, t in (("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn")):
        src, ref = list(ds.lines[s][:32]), list(ds.lines[t][:32])
        hyp = fam.translate(src, s, t, SHORT)
        train += [{"src_lang": s, "tgt_lang": t, "source": a, "target": b} for a, b in zip(src[:24], hyp[:24])]
        val.append({"src_lang": s, "tgt_lang": t, "sources": src[24:], "references": ref[24:], "teacher": hyp[24:]})
    return train, val


def settings(**train):
    from cullmt_ray.heal.config import HealConfig

    cfg = HealConfig()
    cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.warmup = 8, 3, 5e-3, 1
    cfg.train.eval_every, cfg.train.checkpoint_every, cfg.train.max_len = 3, 3, 64
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return {"train": asdict(cfg.train), "lora": asdict(cfg.lora), "resources": asdict(cfg.resources),
            "spm": "reference", "metrics": ["spbleu"], "primary": "spbleu", "decoding": asdict(SHORT)}


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_encdec, kd_pairs, tmp_path_factory):
    from cullmt_ray.heal.lora import train_lora

    train, val = kd_pairs
    out = tmp_path_factory.mktemp("train")
    return train_lora(ModelConfig(str(tiny_encdec)), REMOVED, train, val, settings(), str(out), "two-workers")


def test_two_worker_lora_run_lowers_the_kd_loss(trained):
    hist = trained.history
    assert hist[0]["step"] == 0 and hist[-1]["step"] == trained.state["total_steps"] == 9  # 48 pairs / 8 / 2 workers x 3
    assert all(h["workers"] == 2 for h in hist)
    assert not any("val_kl" in h for h in hist)  # no teacher loaded (train.word_kd 0): no KL to report
    assert hist[-1]["val_kd_loss"] < hist[0]["val_kd_loss"] - 0.05, hist
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]
    assert trained.state["restarts"] == 0 and trained.state["trainable_params"] > 0


def test_export_reloads_with_plain_transformers_and_translates_identically(trained, tiny_encdec, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from cullmt_ray.heal.export import merged_family, save_merged

    sources = list(load_devset("builtin:demo", ["eng_Latn"]).lines["eng_Latn"][40:52])
    with trained.checkpoint.as_directory() as ck:
        with merged_family(ModelConfig(str(tiny_encdec)), REMOVED, Path(ck) / "adapter") as fam:
            size = save_merged(fam, tmp_path / "model", "float32")
            in_memory = plain_translate(fam.model, fam.tokenizer, sources)
            batch = fam.tokenizer(sources, return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = fam.model(**batch, decoder_input_ids=batch["input_ids"][:, :5]).logits
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.decoder_layers == 2 and model.config.encoder_layers == 3
    assert not any("lora" in k for k in model.state_dict())
    assert size["params"] == sum(p.numel() for p in model.parameters())
    assert plain_translate(model, tok, sources) == in_memory
    with torch.no_grad():
        assert torch.equal(model(**batch, decoder_input_ids=batch["input_ids"][:, :5]).logits, logits)
    base = load_family(ModelConfig(str(tiny_encdec)))
    with base.apply(REMOVED), torch.no_grad():
        unhealed = base.model(**batch, decoder_input_ids=batch["input_ids"][:, :5]).logits
    assert (unhealed - logits).abs().max() > 1e-3  # the merged adapter changed the model


@pytest.mark.parametrize("model_dropout", [False, True])
def test_the_frozen_models_dropout_is_off_while_adapters_train_unless_asked(model_dropout):
    """The reference model has dropout 0.1; by default only the adapters' own dropout is active in training,
    so the student is as deterministic as the teacher it is distilled from, and validation keeps that."""
    from peft import get_peft_model

    from cullmt_ray.heal.lora import collate, encode, peft_config, set_training

    fam = load_family(ModelConfig("reference:dense"))
    with fam.apply(["enc.1"]):
        model = get_peft_model(fam.model, peft_config(fam, {"r": 4, "alpha": 8, "dropout": 0.5,
                                                            "target_modules": "auto"}))
        set_training(model, model_dropout)
        lora = {n: m.training for n, m in model.named_modules() if "lora_dropout." in n}
        base = [m.training for n, m in model.named_modules() if "lora" not in n and n]
        assert lora and all(lora.values())  # adapter dropout always on
        assert all(base) if model_dropout else not any(base)
        pairs = [("eng_Latn", "deu_Latn", "A man rides a bike.", "Ein Mann fährt Fahrrad.")] * 4
        batch = collate(encode(fam, pairs, 64), fam.tokenizer.pad_token_id, "cpu")
        torch.manual_seed(0)
        with torch.no_grad():  # lora_B starts at zero: only the frozen model's dropout can make these differ
            a, b = model(**batch).logits, model(**batch).logits
        assert torch.equal(a, b) != model_dropout


@pytest.mark.parametrize("which,unit", [("encdec", "enc.0"), ("llama", "layer.1")])
def test_hidden_state_kd_is_zero_against_itself_and_adds_to_the_kl_of_a_pruned_model(which, unit, tiny_encdec,
                                                                                       tiny_llama):
    from peft import get_peft_model

    from cullmt_ray.heal.lora import collate, encode, peft_config, training_loss

    path = tiny_encdec if which == "encdec" else tiny_llama
    fam, teacher = load_family(ModelConfig(str(path))), load_family(ModelConfig(str(path))).model.eval()
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"])
    pairs = [("eng_Latn", "deu_Latn", a, b) for a, b in zip(ds.lines["eng_Latn"][:8], ds.lines["deu_Latn"][:8])]
    batch = collate(encode(fam, pairs, 64), fam.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        assert float(training_loss(fam.model, fam, teacher, batch, word_kd=1.0, hidden_kd=1.0)) < 1e-5
    with fam.apply([unit]):
        model = get_peft_model(fam.model, peft_config(fam, {"r": 4, "alpha": 8, "dropout": 0.0,
                                                            "target_modules": "auto"}))
        kl = training_loss(model, fam, teacher, batch, word_kd=1.0)
        both = training_loss(model, fam, teacher, batch, word_kd=1.0, hidden_kd=1.0)
        assert float(both) > float(kl) > 0
        (both - kl).backward()  # the hidden-state term alone
        grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n}
        if which == "encdec":  # it trains the encoder (whose output it compares), not the decoder
            assert max(g for n, g in grads.items() if ".encoder." in n) > 0
            assert max(g for n, g in grads.items() if ".decoder." in n) == 0
        else:
            assert max(grads.values()) > 0


def test_matched_layers_are_the_kept_ones_next_to_each_cut():
    from cullmt_ray.heal.lora import matched_layers

    # (stack, student index, teacher index): enc.2 now ends the encoder (its top three went), dec.4 follows dec.3
    assert matched_layers({"enc": 6, "dec": 6}, ["enc.3", "enc.4", "enc.5", "dec.3"]) == [("enc", 2, 5), ("dec", 3, 4)]
    assert matched_layers({"layer": 6}, ["layer.2", "layer.4"]) == [("layer", 2, 3), ("layer", 3, 5)]
    assert matched_layers({"layer": 6}, ["layer.0", "layer.1"]) == [("layer", 0, 2)]
    assert matched_layers({"layer": 6}, ["layer.2", "layer.5"], at="kept") == [
        ("layer", 0, 0), ("layer", 1, 1), ("layer", 2, 3), ("layer", 3, 5)]
    assert matched_layers({"enc": 3, "dec": 3}, ["dec.1"]) == [("dec", 1, 2)]  # nothing in the whole encoder


@pytest.mark.parametrize("unit,zero", [("dec.2", True), ("dec.1", False)])
def test_layer_kd_matches_the_decoder_layers_next_to_a_decoder_cut(unit, zero, tiny_encdec):
    """The tiny model's dec.2 is an identity: without it dec.1 still gives the teacher's top output (term 0).
    Without the real dec.1 the term is positive and, unlike hidden_kd (the encoder output), trains the decoder."""
    from peft import get_peft_model

    from cullmt_ray.heal.lora import collate, encode, matched_modules, peft_config, training_loss

    spec = ModelConfig(str(tiny_encdec))
    fam, teacher = load_family(spec), load_family(spec)
    ds = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"])
    pairs = [("eng_Latn", "deu_Latn", a, b) for a, b in zip(ds.lines["eng_Latn"][:8], ds.lines["deu_Latn"][:8])]
    batch = collate(encode(fam, pairs, 64), fam.tokenizer.pad_token_id, "cpu")
    with fam.apply([unit]):
        model = get_peft_model(fam.model, peft_config(fam, {"r": 4, "alpha": 8, "dropout": 0.0,
                                                            "target_modules": "auto"}))
        layers = matched_modules(fam, teacher, [unit])
        assert [p for p, _, _ in layers] == ["dec"]
        kl = training_loss(model, fam, teacher.model, batch, word_kd=1.0)
        both = training_loss(model, fam, teacher.model, batch, word_kd=1.0, layer_kd=1.0, layers=layers)
        if zero:
            assert abs(float(both - kl)) < 1e-6
            return
        assert float(both) > float(kl) > 0
        (both - kl).backward()
        grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n}
        assert max(g for n, g in grads.items() if ".decoder." in n) > 0


def test_adapters_only_in_the_pruned_stack_and_they_merge_back(tiny_encdec, tmp_path):
    from peft import get_peft_model

    from cullmt_ray.heal.export import merged_family
    from cullmt_ray.heal.lora import linear_names, peft_config

    spec, removed = ModelConfig(str(tiny_encdec)), ["enc.0"]
    fam = load_family(spec)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "auto", "stacks": "pruned"}
    with fam.apply(removed):
        kept, leaves = len(fam.stacks[0].layers), linear_names(fam)
        model = get_peft_model(fam.model, peft_config(fam, lora, removed))
        adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
        assert adapted and all(".encoder.layers." in n for n in adapted)
        assert len(adapted) == kept * len(leaves)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
        model.save_pretrained(tmp_path / "adapter")
        ids = fam.tokenizer(["A dog runs."], return_tensors="pt")
        with torch.no_grad():
            want = model(**ids, decoder_input_ids=ids["input_ids"][:, :3]).logits
    with merged_family(spec, removed, tmp_path / "adapter") as merged, torch.no_grad():
        assert torch.allclose(merged.model(**ids, decoder_input_ids=ids["input_ids"][:, :3]).logits, want, atol=1e-4)
        plain = load_family(spec).model.state_dict()
        decoder = [(n, p) for n, p in merged.model.named_parameters() if ".decoder.layers." in n]
        assert decoder and all(torch.equal(p, plain[n]) for n, p in decoder)  # no adapter merged there


def plain_translate(model, tok, sources, src="eng_Latn", tgt="deu_Latn"):
    tok.src_lang = src
    with torch.no_grad():
        out = model.generate(**tok(sources, return_tensors="pt", padding=True), max_new_tokens=16, do_sample=False,
                             num_beams=1, forced_bos_token_id=tok.convert_tokens_to_ids(tgt))
    return tok.batch_decode(out, skip_special_tokens=True)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, tiny_encdec, kd_pairs, tmp_path):
    from cullmt_ray.heal.lora import train_lora

    train, val = kd_pairs
    flag = tmp_path / "die-once"
    flag.write_text("worker 1 exits at step 5 while this file exists\n")
    oc = train_lora(ModelConfig(str(tiny_encdec)), REMOVED, train, val,
                    settings(epochs=2, checkpoint_every=2, eval_every=0, max_failures=1, word_kd=0.5,
                             label_smoothing=0.1), str(tmp_path / "train"),
                    "fault", fault={"file": str(flag), "step": 5, "rank": 1})
    assert not flag.exists()  # the worker did die
    assert oc.state["restarts"] == 1 and oc.state["resumed_from"] == [4]
    assert oc.state["step"] == oc.state["total_steps"] == 6
    steps = [h["step"] for h in oc.history]
    assert steps == [0, 2, 4, 6], steps  # the run went on from the step-4 checkpoint: nothing before it redone
    validated = [h for h in oc.history if "val_spbleu" in h]  # with a teacher loaded (word_kd) also the KL to it
    assert [h["step"] for h in validated] == [0, 6] and all(h["val_kl"] > 0 for h in validated)
    assert oc.metrics["restarts"] == 1


def test_select_val_kl_exports_the_checkpoint_with_the_lowest_validation_kl(ray_cluster, tiny_encdec, kd_pairs,
                                                                              tmp_path):
    """Validation at every checkpoint; the adapter kept as best reproduces the lowest KL of the history."""
    from cullmt_ray.heal.export import merged_family
    from cullmt_ray.heal.lora import _loss_sum, chosen_adapter, encode, train_lora, training_loss

    train, val = kd_pairs
    spec = ModelConfig(str(tiny_encdec))
    oc = train_lora(spec, REMOVED, train, val, settings(epochs=4, lr=0.05, eval_every=0, checkpoint_every=2,
                                                        word_kd=1.0, select="val_kl"), str(tmp_path), "select")
    kls = {h["step"]: h["val_kl"] for h in oc.history if "val_kl" in h}
    assert sorted(kls) == [0, 2, 4, 6, 8, 10, 12]  # validated at every checkpoint although eval_every is 0
    best = min(kls, key=kls.get)
    assert oc.state["best"] == {"step": best, "val_kl": kls[best]}
    teacher = load_family(spec).model.eval()
    with oc.checkpoint.as_directory() as ck:
        adapter = chosen_adapter(ck)
        assert adapter.name == "best_adapter"
        with merged_family(spec, REMOVED, adapter) as fam:
            tot = cnt = 0
            for g in val:
                ex = encode(fam, [(g["src_lang"], g["tgt_lang"], a, b) for a, b in zip(g["sources"], g["teacher"])], 64)
                t, c = _loss_sum(fam.model, ex, fam.tokenizer.pad_token_id, "cpu",
                                 loss=lambda b: training_loss(fam.model, fam, teacher, b, word_kd=1.0))
                tot, cnt = tot + t, cnt + c
    assert abs(tot / cnt - kls[best]) < 1e-4, (tot / cnt, kls)


def test_kd_cache_is_resumable_and_reused(ray_cluster, tiny_encdec, tmp_path):
    from cullmt_ray.config import ResourcesConfig as Resources
    from cullmt_ray.evaluator import EvalSettings, EvaluatorPool
    from cullmt_ray.families import model_fingerprint
    from cullmt_ray.heal.kd import KDRequest, teacher_translations

    corpus = load_devset("builtin:demo", ["eng_Latn", "deu_Latn"])
    req = KDRequest(model_fingerprint(str(tiny_encdec)), "auto", corpus,
                    (("eng_Latn", "deu_Latn"), ("deu_Latn", "eng_Latn")), 10, 0, SHORT)
    pool = EvaluatorPool(ModelConfig(str(tiny_encdec)), corpus.subsample(4), EvalSettings(spm="reference"),
                         Resources(actors=2), run="kdtest")

    class Counting:
        size, jobs, stop_after = pool.size, 0, None

        def translate_many(self, jobs, decoding=None):
            for key, hyps in pool.translate_many(jobs, decoding):
                yield key, hyps
                Counting.jobs += 1
                if Counting.stop_after is not None and Counting.jobs >= Counting.stop_after:
                    raise KeyboardInterrupt  # killed after two chunks

    try:
        Counting.stop_after = 2
        with pytest.raises(KeyboardInterrupt):
            teacher_translations(Counting(), req, tmp_path / "kd", chunk=4, log=lambda s: None)
        folder = tmp_path / "kd" / req.key()
        parts = list((folder / "parts").glob("*.parquet"))
        assert not (folder / "kd.parquet").exists() and len(parts) == 2
        done = sum(len(pd.read_parquet(p)) for p in parts)  # chunks of 4, 4 and 2 per direction: which two
        Counting.stop_after, Counting.jobs = None, 0     # finished first depends on the actors
        df, info = teacher_translations(Counting(), req, tmp_path / "kd", chunk=4, log=lambda s: None)
        assert Counting.jobs == 4 and info["computed"] == 20 - done and not info["cached"]  # 6 chunks, 2 were done
        assert len(df) == 20 and set(df.columns) >= {"source", "reference", "teacher"}
        direct = load_family(ModelConfig(str(tiny_encdec))).translate(list(df.source[:10]), "eng_Latn", "deu_Latn", SHORT)
        assert list(df.teacher[:10]) == direct
        Counting.jobs = 0
        again, info = teacher_translations(Counting(), req, tmp_path / "kd", chunk=4, log=lambda s: None)
        assert info["cached"] and Counting.jobs == 0 and again.equals(df)
        other = KDRequest(req.model, "auto", corpus, req.directions, 10, 0, Decoding(max_new_tokens=17))
        assert other.key() != req.key()  # decoding settings are part of the key
    finally:
        pool.shutdown()


# ----------------------------------------------------------------------------- candidates and bad input
@pytest.fixture
def run_dir(tmp_path, tiny_encdec) -> Path:
    """A finished search run folder (as cullmt-ray search writes it) over the tiny model."""
    return _finished_run(tmp_path, tiny_encdec)


def _finished_run(tmp_path: Path, tiny_encdec: Path) -> Path:
    from cullmt_ray.config import load_config

    cfg = load_config(None, [f"model.name={tiny_encdec}", "data.languages=[eng_Latn, deu_Latn]",
                             "data.directions=all", "data.max_sentences=8", "metric.spm=reference",
                             "decoding.max_new_tokens=16", "metric.metrics=[spbleu, bleu]",
                             f"output.store={tmp_path / 'store.sqlite'}", "name=t"])
    d = tmp_path / "runs" / "t-1"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (d / "run.json").write_text(json.dumps({"status": "finished", "final": {"removed": ["enc.1", "dec.1"]}}))
    rows = [{"candidate": Candidate.of(u).key, "n_removed": len(u), "removed_units": " ".join(u)}
            for u in ([], ["enc.1"], ["enc.1", "dec.1"])]
    (d / "pareto.json").write_text(json.dumps(rows))
    return d


def test_candidates_from_a_run(run_dir):
    from cullmt_ray.heal import HealError, select_candidates

    assert select_candidates(run_dir, ["best"]) == [Candidate.of(["enc.1", "dec.1"])]
    assert select_candidates(run_dir, ["pareto"]) == [Candidate.of(["enc.1"]), Candidate.of(["enc.1", "dec.1"])]
    key = Candidate.of(["enc.1"]).key
    assert select_candidates(run_dir, [key[:6], "enc.1", "dec.0,enc.2"]) == [Candidate.of(["enc.1"]),
                                                                             Candidate.of(["dec.0", "enc.2"])]
    with pytest.raises(HealError, match="'zzz': no candidate"):
        select_candidates(run_dir, ["zzz"])
    (run_dir / "run.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(HealError, match="has not finished"):
        select_candidates(run_dir, ["best"])


CLI = [sys.executable, "-m", "cullmt_ray.cli", "heal"]


BAD_HEAL_INPUT = [
    (["--candidate", "nope"], "--candidate 'nope': no candidate"),
    (["--candidate", "enc.9"], "unit 'enc.9' is not in"),
    (["--mix", "teacher"], "mix='teacher': expected one of kd, refs, both"),
    (["--set", "lora.r=0"], "lora.r=0: expected >= 1"),
    (["--set", "lora.alpha=big"], "lora.alpha='big': expected an integer"),
    (["--target-modules", "q_proj,wq"], "lora.target_modules: 'wq' matches no linear layer"),
    (["--set", "corpus.path=/no/corpus"], "corpus.path='/no/corpus' does not exist"),
    (["--set", "train.epochs=0"], "train.epochs=0.0: expected > 0"),
    (["--set", "train.select=best"], "train.select='best': expected one of last, val_kl"),
    (["--set", "train.select=val_kl", "--set", "train.val_sentences=0"], "train.select=val_kl: needs validation"),
    (["--set", "train.layer_kd_at=all"], "train.layer_kd_at='all': expected one of cut, kept"),
    (["--config", "nope.yaml"], "heal config 'nope.yaml' does not exist"),
]


@pytest.fixture(scope="module")
def bad_heal_outcomes(tmp_path_factory, tiny_encdec) -> tuple[Path, list[dict]]:
    """Each BAD_HEAL_INPUT case run as the CLI runs it (forked from one process that imported it:
    tests/cli_forkrun.py), all on one finished run folder."""
    from tests.cli_forkrun import run_cases

    d = _finished_run(tmp_path_factory.mktemp("heal-bad"), tiny_encdec)
    demo = Path(__file__).resolve().parents[1] / "cullmt_ray" / "reference" / "demo_dev"
    base = [str(d), "--set", f"corpus.path={demo}", "--set", "corpus.split=null"]
    return d, run_cases([{"argv": ["heal", *base, *args], "cwd": str(d.parent)} for args, _ in BAD_HEAL_INPUT])


@pytest.mark.parametrize("i", range(len(BAD_HEAL_INPUT)), ids=[" ".join(a) for a, _ in BAD_HEAL_INPUT])
def test_bad_heal_input_is_one_clear_line(i, bad_heal_outcomes):
    run_dir, out = bad_heal_outcomes[0], bad_heal_outcomes[1][i]
    assert out["code"] == 2, out["stderr"][-2000:]
    err = out["stderr"].strip().splitlines()
    assert err[-1].startswith("cullmt-ray heal: error:") and BAD_HEAL_INPUT[i][1] in err[-1], out["stderr"][-2000:]
    assert not (run_dir / "heal").exists()  # nothing half-written


def test_heal_without_a_run_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(CLI + [str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "run folder" in out.stderr and "does not exist" in out.stderr


def test_heal_pareto_candidates_in_parallel_end_to_end(ray_cluster, run_dir, tmp_path):
    """KD via the actors, two candidates trained at once (1 worker each on 2 CPUs), merged exports with cards."""
    from transformers import AutoModelForSeq2SeqLM

    from cullmt_ray.heal import load_heal_config, run_heal

    demo = Path(__file__).resolve().parents[1] / "cullmt_ray" / "reference" / "demo_dev"
    cfg = load_heal_config(None, [f"corpus.path={demo}", "corpus.split=null", "corpus.max_sentences=16",
                                  f"kd.cache={tmp_path / 'kd'}", "kd.chunk=8", "kd.decoding.max_new_tokens=16",
                                  "train.batch_size=4", "train.eval_every=0", "train.val_sentences=4",
                                  "resources.workers=1", "mix=both", "name=e2e", "lora.r=4",
                                  "lora.target_modules=[q_proj, v_proj]", "lora.stacks=pruned",
                                  "train.word_kd=0.5", "train.hidden_kd=1"])
    heal_dir = run_heal(run_dir, ["pareto"], cfg, log=lambda s: None)
    status = json.loads((heal_dir / "heal.json").read_text())
    assert status["status"] == "finished" and status["kd"]["pairs"] == 32 and status["training_pairs"] == 64
    assert [r["removed"] for r in status["results"]] == [["enc.1"], ["enc.1", "dec.1"]]
    a, b = (r["training"] for r in status["results"])
    assert a["started"] < b["finished"] and b["started"] < a["finished"]  # trained at the same time
    for r in status["results"]:
        card = json.loads((Path(r["model_dir"]) / "cullmt_ray.json").read_text())
        assert set(card["scores"]) == {"before_pruning", "after_pruning", "after_healing"}
        assert card["signatures"]["spbleu"].startswith("nrefs:1") and "tok:spm[" in card["signatures"]["spbleu"]
        assert card["heal_config"]["mix"] == "both" and card["search_config"]["model"]["name"]
        assert card["lora_targets"] == ["q_proj", "v_proj"]
        readme = (Path(r["model_dir"]) / "README.md").read_text()
        assert "after healing" in readme and r["removed"][0] in readme
        stacks = "`dec.*` and `enc.*`" if "dec.1" in r["removed"] else "`enc.*`"  # adapters only where layers went
        assert f"q_proj, v_proj in the kept {stacks} layers)" in readme
        assert ("Loss: 0.5 x cross-entropy on the targets + 0.5 x token-level KL to the unpruned model + 1 x "
                "relative squared error to its final hidden states; the frozen model's dropout off") in readme
        model = AutoModelForSeq2SeqLM.from_pretrained(r["model_dir"])
        assert model.config.encoder_layers == 2 and model.config.decoder_layers == 3 - ("dec.1" in r["removed"])
