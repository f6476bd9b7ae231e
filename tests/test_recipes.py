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


@pytest.mark.skipif(not (SHARED_DATA / "multi30k").exists(), reason="../shared/data not present")
@pytest.mark.parametrize("arch", ["dense", "moe", "llama"])
def test_recipe_trains_a_few_steps_and_resumes(arch, tmp_path):
    cfg = yaml.safe_load((REPO / "recipes" / "configs" / f"{arch}.yaml").read_text())
    cfg["model"] = TINY[arch]
    cfg["tokenizer"] = str(TOKENIZER_DIR)
    cfg["checkpoint_dir"] = str(tmp_path / "ck")
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["data"].update(dir=str(SHARED_DATA / "multi30k"), limit=48,
                       directions=["eng_Latn-deu_Latn", "deu_Latn-eng_Latn"])
    cfg["train"].update(max_tokens=400, eval_every=1000, eval_sentences=2, checkpoint_every=2, warmup=2, threads=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = [sys.executable, str(REPO / "recipes" / "train_reference.py"), "--config", str(path)]
    first = subprocess.run(script + ["--max-steps", "3"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "finished at step 3" in first.stdout and Path(cfg["checkpoint_dir"], "last.pt").exists()
    assert (Path(cfg["output_dir"]) / "model.safetensors").exists()
    second = subprocess.run(script + ["--max-steps", "5"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    assert "finished at step 5" in second.stdout
