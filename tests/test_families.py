"""Model families: units, pruning without copies, KV-cache renumbering, sizes, export round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from cullmt_ray.config import ModelConfig
from cullmt_ray.families import FamilyError, load_family


@pytest.fixture(scope="module")
def encdec(tiny_encdec):
    return load_family(ModelConfig(str(tiny_encdec)))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_family(ModelConfig(str(tiny_llama)))


def test_units_and_family(encdec, llama):
    assert encdec.name == "encdec" and encdec.units() == ["enc.0", "enc.1", "enc.2", "dec.0", "dec.1", "dec.2"]
    assert llama.name == "decoder" and llama.units() == ["layer.0", "layer.1", "layer.2", "layer.3"]


def test_apply_shares_weights_and_restores(encdec):
    layers = list(encdec.model.model.decoder.layers)
    ptrs = {n: p.data_ptr() for n, p in encdec.model.named_parameters()}
    with encdec.apply(["dec.1", "enc.0"]) as m:
        assert len(m.model.decoder.layers) == 2 and m.config.decoder_layers == 2
        assert len(m.model.encoder.layers) == 2 and m.config.encoder_layers == 2
        assert m.model.decoder.layers[1] is layers[2]  # same module object: nothing copied
        assert m.model.decoder.layers[1].self_attn.layer_idx == 1
    assert list(encdec.model.model.decoder.layers) == layers
    assert encdec.model.config.decoder_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert {n: p.data_ptr() for n, p in encdec.model.named_parameters()} == ptrs


@pytest.mark.parametrize("which,unit", [("encdec", "dec.1"), ("llama", "layer.1")])
def test_kv_cache_after_removing_a_middle_layer(which, unit, request, demo_sources):
    """Without renumbering layer_idx, cached generation raises IndexError; with it, cached == uncached."""
    fam = request.getfixturevalue(which)
    with fam.apply([unit]) as m:
        cached = fam.translate(demo_sources, "eng_Latn", "deu_Latn")
        m.generation_config.use_cache = False
        try:
            uncached = fam.translate(demo_sources, "eng_Latn", "deu_Latn")
        finally:
            m.generation_config.use_cache = True
    assert cached == uncached


@pytest.mark.parametrize("which,identity,real", [("encdec", "dec.2", "dec.0"), ("encdec", "enc.1", "enc.2"),
                                                  ("llama", "layer.2", "layer.1")])
def test_identity_layer_removal_changes_nothing(which, identity, real, request, demo_sources):
    fam = request.getfixturevalue(which)
    base = fam.translate(demo_sources, "eng_Latn", "deu_Latn")
    with fam.apply([identity]):
        assert fam.translate(demo_sources, "eng_Latn", "deu_Latn") == base
    with fam.apply([real]):
        assert fam.translate(demo_sources, "eng_Latn", "deu_Latn") != base


def test_size_accounts_removed_layers(encdec):
    full = encdec.size()
    layer = encdec.model.model.decoder.layers[0]
    n = sum(p.numel() for p in layer.parameters())
    assert full.params == sum(p.numel() for p in encdec.model.parameters())
    assert encdec.size(["dec.0"]).params == full.params - n
    assert encdec.size(["dec.0"]).bytes == full.bytes - 4 * n  # fp32 on CPU


def test_bad_prune_sets(encdec):
    with pytest.raises(FamilyError, match="'dec.9' is not a unit of this model"):
        encdec.size(["dec.9"])
    with pytest.raises(FamilyError, match="removes every layer of 'enc'"):
        with encdec.apply(["enc.0", "enc.1", "enc.2"]):
            pass
    assert len(encdec.model.model.encoder.layers) == 3


@pytest.mark.parametrize("which,removed,auto", [("encdec", ["enc.0", "dec.1"], AutoModelForSeq2SeqLM),
                                                 ("llama", ["layer.1"], AutoModelForCausalLM)])
def test_export_reloads_with_plain_transformers(which, removed, auto, request, tmp_path, demo_sources):
    fam = request.getfixturevalue(which)
    with fam.apply(removed):
        expected = fam.translate(demo_sources, "eng_Latn", "fra_Latn")
    out = fam.export(removed, tmp_path / "pruned")
    model = auto.from_pretrained(out).eval()  # plain transformers, no cullmt_ray involved
    tok = AutoTokenizer.from_pretrained(out)
    n_layers = sum(len(s.layers) for s in fam.stacks)
    assert sum(p.numel() for p in model.parameters()) == fam.size(removed).params
    reloaded = type(fam)(model, tok, str(out))
    assert sum(len(s.layers) for s in reloaded.stacks) == n_layers - len(removed)
    assert reloaded.translate(demo_sources, "eng_Latn", "fra_Latn") == expected
    # the state dict is renumbered: layer keys run 0..n-1 with no gaps
    keys = {k.split(".layers.")[1].split(".")[0] for k in model.state_dict() if ".layers." in k}
    assert keys == {str(i) for i in range(max(int(k) for k in keys) + 1)}


def test_bad_model_path():
    with pytest.raises(FamilyError, match="no such model folder"):
        load_family(ModelConfig("/nonexistent/model"))


def test_dtype_choice(tiny_encdec):
    fam = load_family(ModelConfig(str(tiny_encdec), dtype="bfloat16"))
    assert next(fam.model.parameters()).dtype == torch.bfloat16
    assert fam.size().bytes == 2 * fam.size().params


def test_proxies_are_zero_exactly_for_identity_layers(tiny_encdec, tiny_llama, demo_sources):
    from cullmt_ray.proxies import proxy_scores, spearman

    for path, identities in ((tiny_encdec, {"enc.1", "dec.2"}), (tiny_llama, {"layer.2"})):
        fam = load_family(ModelConfig(str(path)))
        batch = fam.teacher_forced(demo_sources[:6], demo_sources[6:12], "eng_Latn", "deu_Latn")
        assert batch[1].any() and batch[1].shape == batch[0]["input_ids"].shape[:1] + batch[1].shape[1:]
        scores = proxy_scores(fam, [batch], fam.units())
        for u in fam.units():
            if u in identities:
                assert scores["kl"][u] < 1e-12 and scores["angle"][u] < 1e-3, (u, scores)
            else:
                assert scores["kl"][u] > 1e-12 and scores["angle"][u] > 1e-3, (u, scores)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0


def _tiny_moe():
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    torch.manual_seed(0)
    cfg = NllbMoeConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4,
                        expert_capacity=64, encoder_sparse_step=2, decoder_sparse_step=2, encoder_layerdrop=0.0,
                        decoder_layerdrop=0.0)
    return NllbMoeForConditionalGeneration(cfg)


def _expert_calls(model, x):
    import collections

    calls, wanted = collections.Counter(), collections.Counter()
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith("ffn.experts"):
            for key, expert in mod.items():
                hooks.append(expert.register_forward_hook(
                    lambda m, a, o, k=f"{name}.{key}": calls.update({k: a[0].shape[0]})))
        if name.endswith("ffn.router"):
            def count(m, a, o, n=name.replace("router", "experts")):
                probs = o[1]  # combine weights: non-zero for each token's top-1 and top-2 experts
                wanted.update({f"{n}.expert_{i}": int((probs[:, i] > 0).sum()) for i in range(probs.shape[1])})
            hooks.append(mod.register_forward_hook(count))
    model(input_ids=x, decoder_input_ids=x)
    for h in hooks:
        h.remove()
    return calls, +wanted


def test_stock_nllb_moe_dispatch_is_broken_and_the_fix_runs_the_routed_experts():
    from transformers.models.nllb_moe import modeling_nllb_moe as m

    from cullmt_ray.families import nllb_moe_fix

    model = _tiny_moe().eval()
    x = torch.randint(3, 100, (4, 10))
    stock = getattr(m.NllbMoeExperts, "_stock_forward", m.NllbMoeExperts.forward)
    saved = m.NllbMoeExperts.forward
    try:
        m.NllbMoeExperts.forward = stock
        with torch.no_grad():
            calls, wanted = _expert_calls(model, x)
        # transformers 5.23: only expert_0/expert_1 modules ever run, whatever the router chose.
        # If this starts failing, upstream fixed NllbMoeExperts.forward and the patch can go.
        assert {k.rsplit(".", 1)[1] for k in calls} == {"expert_0", "expert_1"}
        assert any(k.endswith(("expert_2", "expert_3")) for k in wanted)
    finally:
        m.NllbMoeExperts.forward = saved
    nllb_moe_fix.install()
    with torch.no_grad():
        calls, wanted = _expert_calls(model, x)
    assert calls == wanted and len(calls) > 4  # every expert runs on exactly the tokens routed to it
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    grads = {n for n, p in model.named_parameters() if "experts" in n and p.grad is not None and p.grad.abs().sum() > 0}
    assert {n.split(".experts.")[1].split(".")[0] for n in grads} == {"expert_0", "expert_1", "expert_2", "expert_3"}
