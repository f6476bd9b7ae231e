"""Tiny models built from configs (random weights) for tests and benchmarks.

They use the reference tokenizer, so they speak its language codes. Layers can be made exact
identities (their residual branches output zero), which gives searches a known right answer.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

TOKENIZER_DIR = Path(str(resources.files("cullmt_ray") / "reference" / "tokenizer"))


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def build_encdec(out_dir: str | Path, encoder_layers: int = 3, decoder_layers: int = 3, d_model: int = 64,
                 seed: int = 0, identity: tuple[str, ...] = (), init_std: float = 0.2) -> Path:
    """A random M2M100 (NLLB architecture) saved with the reference tokenizer."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    tok = tokenizer()
    torch.manual_seed(seed)
    conf = M2M100Config(vocab_size=len(tok), d_model=d_model, encoder_layers=encoder_layers,
                        decoder_layers=decoder_layers, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, max_position_embeddings=256,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                        init_std=init_std, dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0)
    model = M2M100ForConditionalGeneration(conf).eval()
    for unit in identity:
        make_identity(model, unit)
    return _save(model, tok, out_dir)


def build_llama(out_dir: str | Path, layers: int = 4, d_model: int = 64, seed: int = 0,
                identity: tuple[str, ...] = ()) -> Path:
    """A random Llama saved with the reference tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, initializer_range=0.2, tie_word_embeddings=True)
    model = LlamaForCausalLM(conf).eval()
    for unit in identity:
        make_identity(model, unit)
    return _save(model, tok, out_dir)


def build_moe(out_dir: str | Path, layers: int = 2, d_model: int = 64, num_experts: int = 4, seed: int = 0,
              zero_experts: tuple[str, ...] = ()) -> Path:
    """A random NLLB-MoE (every other layer sparse, top-2 routing) saved with the reference tokenizer.
    ``zero_experts`` (``enc.1.expert.2``) get zero output projections: removing them changes nothing
    for tokens the router sends elsewhere."""
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    tok = tokenizer()
    torch.manual_seed(seed)
    conf = NllbMoeConfig(vocab_size=len(tok), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                         decoder_ffn_dim=2 * d_model, num_experts=num_experts, expert_capacity=64,
                         encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         decoder_start_token_id=tok.eos_token_id, init_std=0.2, dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, moe_token_dropout=0.0)
    model = NllbMoeForConditionalGeneration(conf).eval()
    with torch.no_grad():
        for unit in zero_experts:
            layer, _, e = unit.rpartition(".expert.")
            _layer(model, layer).ffn.experts[f"expert_{e}"].fc2.weight.zero_()
            _layer(model, layer).ffn.experts[f"expert_{e}"].fc2.bias.zero_()
    return _save(model, tok, out_dir)


def _layer(model: nn.Module, unit: str) -> nn.Module:
    prefix, idx = unit.rsplit(".", 1)
    inner = model.model
    stack = {"enc": getattr(inner, "encoder", None), "dec": getattr(inner, "decoder", None)}.get(prefix, inner)
    return stack.layers[int(idx)]


@torch.no_grad()
def make_identity(model: nn.Module, unit: str) -> None:
    """Zero every residual branch's output projection of ``unit``: the layer becomes x -> x."""
    layer = _layer(model, unit)
    outs = [m for n, m in layer.named_modules() if isinstance(m, nn.Linear)
            and n.split(".")[-1] in ("out_proj", "o_proj", "fc2", "down_proj")]
    if not outs:
        raise ValueError(f"{unit}: no output projections found")
    for lin in outs:
        lin.weight.zero_()
        if lin.bias is not None:
            lin.bias.zero_()


def _save(model: nn.Module, tok, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def insert_identity_layers(model_dir: str | Path, out_dir: str | Path, positions: dict[str, list[int]]) -> Path:
    """Copy a model, inserting exact-identity layers (copies of a neighbour with zeroed output
    projections) at ``positions`` per stack (``{"enc": [2], "dec": [0]}``: indices in the new stack)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from .families import resolve_model_path

    path = resolve_model_path(str(model_dir))
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path)
    except ValueError:
        model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    inner = model.model
    stacks = {"enc": getattr(inner, "encoder", None), "dec": getattr(inner, "decoder", None), "layer": inner}
    counts = {"enc": "encoder_layers", "dec": "decoder_layers", "layer": "num_hidden_layers"}
    for prefix, where in positions.items():
        owner = stacks[prefix]
        layers = list(owner.layers)
        for pos in sorted(where):
            new = copy.deepcopy(layers[min(pos, len(layers) - 1)])
            layers.insert(pos, new)
        owner.layers = nn.ModuleList(layers)
        for i, layer in enumerate(layers):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
        setattr(model.config, counts[prefix], len(layers))
        for pos in where:
            make_identity(model, f"{prefix}.{pos}")
    return _save(model.eval(), tok, out_dir)
