"""NLLB-MoE expert pruning: router masking on real forward passes, gate statistics against a hand
count, selection rules, export/reload round trips, and the `experts` study on Ray."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cullmt_ray.experts import Selection, select, side_stats
from cullmt_ray.config import ModelConfig
from cullmt_ray.families import FamilyError, load_family, model_units

from .conftest import search_config, write_self_reference_devset

SRC = ["A man in a blue shirt is standing on a ladder.", "Two dogs play in the snow.",
       "A woman sells fruit at a market.", "Children are running on the beach."]
TGT = ["Ein Mann steht auf einer Leiter.", "Zwei Hunde spielen im Schnee.", "Eine Frau verkauft Obst.",
       "Kinder laufen am Strand."]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from cullmt_ray.tiny import build_moe

    return build_moe(tmp_path_factory.mktemp("m") / "moe", layers=2, d_model=64, num_experts=4)


@pytest.fixture(scope="module")
def family(tiny_moe):
    return load_family(ModelConfig(str(tiny_moe)))


def routed(family, inputs) -> dict[str, torch.Tensor]:
    """Per sparse layer, how many tokens got a non-zero combine weight for each expert (read from
    the routers' own outputs, independently of the family's statistics code)."""
    seen = {layer: torch.zeros(family.num_experts, dtype=torch.long) for layer in family.sparse}
    def count(layer):
        def hook(mod, args, out):
            seen[layer].add_((out[1] > 0).sum(0))  # returns None: the output stays as it is
        return hook

    hooks = [mlp.router.register_forward_hook(count(layer)) for layer, mlp in family.sparse.items()]
    try:
        with torch.inference_mode():
            family.model(**inputs)
            family.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  max_new_tokens=12, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_units_are_experts_and_sizes_drop_by_expert(family):
    assert family.name == "moe"
    assert family.units() == [f"{l}.expert.{e}" for l in ("enc.1", "dec.1") for e in range(4)]
    one = family.size(["enc.1.expert.2"])
    expert = family.sparse["enc.1"].experts["expert_2"]
    assert family.size().params - one.params == sum(p.numel() for p in expert.parameters()) + 64  # + router row
    with pytest.raises(FamilyError, match="removes every expert of 'dec.1'"):
        family.size([f"dec.1.expert.{e}" for e in range(4)])
    with pytest.raises(FamilyError, match="not an expert"):
        family.size(["enc.0.expert.0"])


def test_router_never_selects_a_removed_expert(family):
    inputs, _ = family.teacher_forced(SRC, TGT, "eng_Latn", "deu_Latn")
    before = routed(family, inputs)
    removed = ["enc.1.expert.0", "enc.1.expert.3", "dec.1.expert.1"]
    assert before["enc.1"][[0, 3]].sum() > 0 and before["dec.1"][1] > 0  # they were used before
    with family.apply(removed):
        after = routed(family, inputs)
    assert after["enc.1"][[0, 3]].sum() == 0 and after["dec.1"][1] == 0
    assert after["enc.1"].sum() > 0 and after["dec.1"].sum() > 0
    assert torch.equal(routed(family, inputs)["enc.1"], before["enc.1"])  # restored on exit


def test_gate_statistics_match_a_hand_count(family):
    inputs, _ = family.teacher_forced(SRC, TGT, "eng_Latn", "deu_Latn")
    stats = family.gate_stats([lambda: family.model(**inputs)], {"enc": "eng_Latn", "dec": "deu_Latn"})
    with torch.inference_mode():
        out = family.model(**inputs, output_router_logits=True)
    # Encoder: the router logits of the sparse layer, real (non-pad) tokens only, counted by hand.
    enc_logits = [t for t in out.encoder_router_logits if t is not None][-1].reshape(-1, 4)
    real = inputs["attention_mask"].reshape(-1).bool()
    probs = torch.softmax(enc_logits[real].float(), -1)
    top1 = probs.argmax(-1)
    top2 = probs.scatter(1, top1[:, None], -1.0).argmax(-1)
    enc = stats["layers"]["enc.1"]
    assert enc["tokens"] == int(real.sum())
    assert enc["top1"] == torch.bincount(top1, minlength=4).tolist()
    assert enc["top2"] == torch.bincount(top2, minlength=4).tolist()
    assert np.allclose(enc["prob_sum"], probs.sum(0).double().numpy())
    conf = probs.max(-1).values
    assert np.allclose(enc["importance"], [float(conf[top1 == e].exp().sum()) for e in range(4)])
    dec_real = (inputs["decoder_input_ids"] != family.tokenizer.pad_token_id).reshape(-1)
    assert stats["layers"]["dec.1"]["tokens"] == int(dec_real.sum())


def _stats(top1_enc, top1_dec):
    layer = lambda t: {"tokens": sum(t), "top1": t, "top2": [0] * len(t), "prob_sum": t, "importance": t}
    return {"enc.1": layer(top1_enc), "enc.3": layer(top1_enc[::-1]), "dec.1": layer(top1_dec)}


def test_selection_rules():
    present = {"enc.1": [0, 1, 2, 3], "enc.3": [0, 1, 2, 3], "dec.1": [0, 1, 2, 3]}
    st = _stats([10, 1, 5, 0], [0, 7, 2, 9])
    # keep 6 of 12 at 2:1 -> 4 encoder, 2 decoder; per layer: the 2 best of each encoder layer
    gone = select(st, present, Selection(0.5, "top1", "per_layer", 1, 2.0))
    assert sorted(gone) == ["dec.1.expert.0", "dec.1.expert.2", "enc.1.expert.1", "enc.1.expert.3",
                            "enc.3.expert.0", "enc.3.expert.2"]
    # global keeps the best normalised scores over both encoder layers, at least one per layer
    gone = select(st, present, Selection(0.25, "top1", "global", 1, 2.0))  # keep 3: 2 encoder, 1 decoder
    kept = {u for u in [f"{l}.expert.{e}" for l, es in present.items() for e in es]} - set(gone)
    assert kept == {"enc.1.expert.0", "enc.3.expert.3", "dec.1.expert.3"}
    with pytest.raises(ValueError, match="experts.score='bogus'"):
        select(st, present, Selection(0.5, "bogus"))


def test_language_granularity_uses_source_for_encoder_and_target_for_decoder():
    a = {"layers": {"enc.1": {"tokens": 1, "top1": [1, 0]}, "dec.1": {"tokens": 1, "top1": [0, 1]}}}
    b = {"layers": {"enc.1": {"tokens": 1, "top1": [0, 1]}, "dec.1": {"tokens": 1, "top1": [1, 0]}}}
    st = side_stats({"eng_Latn-deu_Latn": a, "deu_Latn-eng_Latn": b}, "eng_Latn", "eng_Latn", "language")
    assert list(st["enc.1"]["top1"]) == [1, 0] and list(st["dec.1"]["top1"]) == [1, 0]
    with pytest.raises(ValueError, match="no gate statistics for eng_Latn-fra_Latn"):
        side_stats({"eng_Latn-deu_Latn": a}, "eng_Latn", "fra_Latn", "pair")


def test_export_with_equal_counts_loads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from cullmt_ray.families import nllb_moe_fix

    removed = ["enc.1.expert.1", "dec.1.expert.2"]
    with family.apply(removed):
        expected = family.translate(SRC, "eng_Latn", "deu_Latn")
    out = family.export(removed, tmp_path / "uniform")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 3 and "cullmt_missing_experts" not in cfg
    nllb_moe_fix.install()  # transformers' stock dispatch ignores the router (see nllb_moe_fix)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    tok.src_lang = "eng_Latn"
    enc = tok(SRC, return_tensors="pt", padding=True)
    ids = model.generate(**enc, forced_bos_token_id=tok.convert_tokens_to_ids("deu_Latn"), do_sample=False,
                         num_beams=1, max_new_tokens=min(128, enc["input_ids"].shape[1] * 2 + 10))
    assert [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)] == expected
    assert sum(p.numel() for p in model.parameters()) == family.size(removed).params


def test_export_with_uneven_counts_round_trips_through_the_loader(family, tmp_path):
    removed = ["enc.1.expert.0", "enc.1.expert.3", "dec.1.expert.1"]
    with family.apply(removed):
        expected = family.translate(SRC, "eng_Latn", "deu_Latn")
    out = family.export(removed, tmp_path / "uneven")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 3 and cfg["cullmt_missing_experts"] == {"model.encoder.layers.1.ffn": [2]}
    meta = json.loads((out / "cullmt_ray.json").read_text())
    assert meta["loader"] == "cullmt_ray.families.moe.load_pruned_moe" and meta["kept_experts"]["enc.1"] == [1, 2]
    again = load_family(ModelConfig(str(out)))
    assert again.translate(SRC, "eng_Latn", "deu_Latn") == expected
    # the router keeps one (zero, masked) row for enc.1's missing slot: the only overhead of uneven counts
    assert again.size().params == family.size(removed).params + 64


def test_expert_study_on_ray_writes_report_and_export(ray_cluster, tiny_moe, tmp_path):
    from cullmt_ray.expert_study import run_expert_study

    dev = write_self_reference_devset(tiny_moe, tmp_path / "dev", SRC)
    cfg = search_config(tmp_path, tiny_moe, dev, experts__rates="[0.25, 0.5]", decoding__max_new_tokens=24,
                        experts__controls="[random, reverse]", name="x")
    run = run_expert_study(cfg, ["eng_Latn-deu_Latn@0.5"])
    rep = json.loads((run / "experts.json").read_text())
    stats = json.loads((run / "gate_stats.json").read_text())
    assert set(stats["directions"]) == {"eng_Latn-deu_Latn"}
    assert [r["rate"] for r in rep["rates"]] == [0.25, 0.5]
    assert rep["baseline"]["score"] > 0  # references: the model's own (longer) outputs
    rows = {r["rate"]: r for r in rep["rows"]}
    assert rows[0.25]["experts_removed"] == 2 and rows[0.5]["experts_removed"] == 4
    assert rows[0.5]["bytes"] < rows[0.25]["bytes"] < rep["baseline"]["bytes"]
    exported = rep["exported"]["eng_Latn-deu_Latn@0.5"]
    reloaded = load_family(ModelConfig(exported))
    assert model_units(ModelConfig(exported))[1] == reloaded.units()  # the driver's units: the export's experts
    missing = json.loads((Path(exported) / "config.json").read_text()).get("cullmt_missing_experts", {})
    assert reloaded.size().params == rows[0.5]["params"] + 64 * sum(len(v) for v in missing.values())  # router rows
    md = (run / "experts.md").read_text()
    assert md.startswith("# Expert pruning") and "| removed | gate statistics | random | reverse |" in md
    # controls: random experts with the selection's count per layer; no reverse direction in this run
    ctl = rep["controls"]["rows"]
    assert [c["control"] for c in ctl] == ["random", "random"]
    for c in ctl:
        mine = next(r for r in rep["rows"] if r["rate"] == c["rate"])
        assert Counter(u.rsplit(".expert.", 1)[0] for u in c["removed"]) == \
            Counter(u.rsplit(".expert.", 1)[0] for u in mine["removed"])
        assert c["loss"] == round(rep["baseline"]["score"] - c["score"], 4)
    assert [t["reverse"] for t in rep["controls"]["mean_loss"]] == [None, None]


def test_expert_controls_are_validated(tmp_path):
    from cullmt_ray.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("experts:\n  controls: [random, shuffled]\n")
    with pytest.raises(ConfigError, match=r"experts.controls='shuffled': expected one of random, reverse"):
        load_config(path)
