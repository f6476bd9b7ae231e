"""The reference-model recipes: the tokenizer round-trips; training runs a few steps and resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from cullmt_ray.data import load_devset
from cullmt_ray.tiny import TOKENIZER_DIR

from .conftest import REPO, SHARED_DATA

TINY = {
    "dense": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
              "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64},
    "moe": {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_experts": 2,
            "expert_capacity": 64, "encoder_sparse_step": 2, "decoder_sparse_step": 2},
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2},
}


def test_reference_tokenizer_is_nllb_like_and_round_trips():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, src_lang="deu_Latn", tgt_lang="ces_Latn")
    assert type(tok).__name__ == "NllbTokenizer"
    ds = load_devset("builtin:demo")
    for code, lines in ds.lines.items():
        tok.src_lang = code
        for s in lines[:50]:
            ids = tok(s)["input_ids"]
            assert ids[0] == tok.convert_tokens_to_ids(code) and ids[-1] == tok.eos_token_id
            assert tok.decode(ids, skip_special_tokens=True) == s
    enc = tok("Ein Hund.", text_target="Pes.")
    assert enc["labels"][0] == tok.convert_tokens_to_ids("ces_Latn")
    assert tok.convert_ids_to_tokens(tok("Ein Hund.")["input_ids"])[1:3] == ["▁Ein", "▁Hund"]


def _tiny_recipe(tmp_path, arch: str, name: str, directions: list[str] | None = None,
                 warmup: int = 1) -> tuple[dict, list[str]]:
    """The shipped recipe for ``arch`` shrunk to a tiny model on 48 Multi30k lines, writing under tmp_path/name;
    returns it and the command line up to ``--config`` (the shipped MoE's ``init_from`` is dropped)."""
    cfg = yaml.safe_load((REPO / "recipes" / "configs" / f"{arch}.yaml").read_text())
    cfg["model"] = TINY[arch]
    cfg.pop("init_from", None)
    cfg["tokenizer"] = str(TOKENIZER_DIR)
    cfg["checkpoint_dir"] = str(tmp_path / name / "ck")
    cfg["output_dir"] = str(tmp_path / name / "out")
    cfg["data"].update(dir=str(SHARED_DATA / "multi30k"), limit=48, directions=directions or ["eng_Latn-deu_Latn"])
    cfg["train"].update(max_tokens=400, eval_every=1000, eval_sentences=2, checkpoint_every=2, warmup=warmup,
                        threads=1)
    return cfg, [sys.executable, str(REPO / "recipes" / "train_reference.py"), "--config"]


@pytest.mark.skipif(not (SHARED_DATA / "multi30k").exists(), reason="../shared/data not present")
@pytest.mark.parametrize("arch", ["dense", "moe", "llama"])
def test_recipe_trains_a_few_steps_and_resumes(arch, tmp_path):
    cfg, script = _tiny_recipe(tmp_path, arch, arch, ["eng_Latn-deu_Latn", "deu_Latn-eng_Latn"], warmup=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = [*script, str(path)]
    first = subprocess.run(script + ["--max-steps", "3"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "finished at step 3" in first.stdout and Path(cfg["checkpoint_dir"], "last.pt").exists()
    assert (Path(cfg["output_dir"]) / "model.safetensors").exists()
    second = subprocess.run(script + ["--max-steps", "5"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    assert "finished at step 5" in second.stdout


@pytest.mark.skipif(not (SHARED_DATA / "multi30k").exists(), reason="../shared/data not present")
def test_moe_recipe_starts_from_a_dense_checkpoint(tmp_path):
    """init_from: the MoE recipe loads a dense checkpoint, validates the starting point, trains, and a
    second run resumes from its own checkpoint instead of upcycling again."""
    dense, script = _tiny_recipe(tmp_path, "dense", "dense")
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(dense))
    ran = subprocess.run([*script, str(tmp_path / "dense.yaml"), "--max-steps", "2"], capture_output=True, text=True,
                         timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    moe, _ = _tiny_recipe(tmp_path, "moe", "moe")
    moe["init_from"] = {"model": dense["output_dir"], "encoder_layers": [0, 0], "decoder_layers": [0, 0],
                        "expert_drop": 0.5}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(moe))
    first = subprocess.run([*script, str(tmp_path / "moe.yaml"), "--max-steps", "2"], capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"initialised from {dense['output_dir']}" in first.stdout and "val BLEU at step 0" in first.stdout
    second = subprocess.run([*script, str(tmp_path / "moe.yaml"), "--max-steps", "3"], capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "initialised from" not in second.stdout
    moe["init_from"]["encoder_layers"] = [0, 5]
    moe["checkpoint_dir"] = str(tmp_path / "moe2")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(moe))
    bad = subprocess.run([*script, str(tmp_path / "bad.yaml"), "--max-steps", "1"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "init_from.encoder_layers: 5 is not a layer of the dense model" in bad.stderr


def test_upcycled_moe_computes_the_dense_model_without_the_layers_left_out():
    """init_from with no noise: every expert is the dense layer's FFN, so the MoE's logits equal those of
    the dense model with the unpicked layers removed; with noise the experts differ from each other."""
    import importlib.util

    import torch
    from transformers import (
        M2M100Config,
        M2M100ForConditionalGeneration,
        NllbMoeConfig,
        NllbMoeForConditionalGeneration,
    )

    from cullmt_ray.families import nllb_moe_fix

    nllb_moe_fix.install()
    spec = importlib.util.spec_from_file_location("upcycle", REPO / "recipes" / "upcycle.py")
    up = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(up)
    shape = dict(vocab_size=50, d_model=32, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, decoder_start_token_id=2)
    torch.manual_seed(0)
    dense = M2M100ForConditionalGeneration(M2M100Config(encoder_layers=4, decoder_layers=3, **shape)).eval()
    moe_cfg = NllbMoeConfig(encoder_layers=2, decoder_layers=2, num_experts=4, expert_capacity=1000,
                            encoder_sparse_step=2, decoder_sparse_step=2, moe_token_dropout=0.0, **shape)
    moe = NllbMoeForConditionalGeneration(moe_cfg).eval()
    counts = up.upcycle(moe, dense, [0, 3], [1, 2])
    assert counts["expert"] == 2 * 4 * 4  # 2 sparse layers x 4 experts x (fc1, fc2) x (weight, bias)
    pruned = M2M100ForConditionalGeneration(M2M100Config(encoder_layers=4, decoder_layers=3, **shape)).eval()
    pruned.load_state_dict(dense.state_dict())
    pruned.model.encoder.layers = torch.nn.ModuleList([pruned.model.encoder.layers[i] for i in (0, 3)])
    pruned.model.decoder.layers = torch.nn.ModuleList([pruned.model.decoder.layers[i] for i in (1, 2)])
    ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 1, 1]])
    dec = torch.tensor([[2, 11, 12], [2, 13, 14]])
    with torch.no_grad():
        want = pruned(input_ids=ids, attention_mask=(ids != 1).long(), decoder_input_ids=dec).logits
        got = moe(input_ids=ids, attention_mask=(ids != 1).long(), decoder_input_ids=dec).logits
    assert torch.allclose(got, want, atol=1e-5)
    noisy = NllbMoeForConditionalGeneration(moe_cfg)
    up.upcycle(noisy, dense, [0, 3], [1, 2], expert_noise=0.01)
    experts = noisy.model.encoder.layers[1].ffn.experts
    assert not torch.equal(experts["expert_0"].fc1.weight, experts["expert_1"].fc1.weight)
    dropped = NllbMoeForConditionalGeneration(moe_cfg)
    up.upcycle(dropped, dense, [0, 3], [1, 2], expert_drop=0.5)
    src = dense.model.encoder.layers[3].fc1.weight
    kept = [(dropped.model.encoder.layers[1].ffn.experts[f"expert_{e}"].fc1.weight == src).all(1) for e in range(4)]
    assert all(int(k.sum()) == 32 for k in kept)  # half of the 64 hidden units keep the dense weights
    assert len({tuple(k.tolist()) for k in kept}) == 4  # a different half in each expert
    fc2 = dropped.model.encoder.layers[1].ffn.experts["expert_0"].fc2.weight
    assert torch.equal(fc2[:, kept[0]], dense.model.encoder.layers[3].fc2.weight[:, kept[0]])
    with pytest.raises(ValueError, match=r"init_from.encoder_layers: 7 is not a layer"):
        up.upcycle(noisy, dense, [0, 7], [1, 2])
