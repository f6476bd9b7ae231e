"""Sparse upcycling: start an NLLB-MoE model from a trained dense NLLB (M2M100) model.

The MoE takes the dense model's embeddings, final norms and LM head, and for each of its layers the
attention, norms and feed-forward block of one chosen dense layer; every expert of a sparse layer
starts as a copy of that layer's feed-forward block, and the router starts as in a fresh model.
With no noise and no drop the MoE computes exactly the dense model without the layers left out (top-2
weights sum to one over equal experts).

Copies make experts that stay nearly equal (removing 80% of them then costs nothing, and expert
pruning has nothing to find), so two knobs make them differ:

- ``expert_drop`` (Drop-Upcycling, Nakamura et al., ICLR 2025): in each expert a different random
  fraction of the hidden units (rows of ``fc1``, columns of ``fc2``, entries of ``fc1.bias``) is
  re-initialised from a normal with the dense weights' mean and standard deviation;
- ``expert_noise``: every weight times ``1 + noise * N(0, 1)``.

Used by ``train_reference.py`` when the config has an ``init_from`` block::

    init_from:
      model: cullmt_ray/reference/models/dense   # a dense M2M100 checkpoint folder, same tokenizer
      encoder_layers: [0, 2, 4, 5]               # dense layer for each MoE encoder layer, in order
      decoder_layers: [0, 2, 4, 5]
      expert_drop: 0.5
      expert_noise: 0.0
"""

from __future__ import annotations

import torch

# M2M100 name -> NLLB-MoE name, inside one layer (the feed-forward block is handled separately)
_ENC = {"self_attn.": "self_attn.", "self_attn_layer_norm.": "self_attn_layer_norm.",
        "final_layer_norm.": "ff_layer_norm."}
_DEC = {**_ENC, "encoder_attn.": "cross_attention.", "encoder_attn_layer_norm.": "cross_attention_layer_norm."}
_TOP = ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
        "model.encoder.layer_norm.weight", "model.encoder.layer_norm.bias", "model.decoder.layer_norm.weight",
        "model.decoder.layer_norm.bias", "lm_head.weight"]


def upcycle(moe: torch.nn.Module, dense: torch.nn.Module, encoder_layers: list[int], decoder_layers: list[int],
            expert_noise: float = 0.0, seed: int = 0, expert_drop: float = 0.0) -> dict[str, int]:
    """Copy ``dense``'s weights into ``moe`` in place; returns how many tensors were copied per kind."""
    mc, dc = moe.config, dense.config
    for side, picks, n_moe, n_dense in (("encoder", encoder_layers, mc.encoder_layers, dc.encoder_layers),
                                       ("decoder", decoder_layers, mc.decoder_layers, dc.decoder_layers)):
        if len(picks) != n_moe:
            raise ValueError(f"init_from.{side}_layers={picks}: expected {n_moe} dense layer indices "
                             f"(one per MoE {side} layer)")
        bad = [i for i in picks if not 0 <= i < n_dense]
        if bad:
            raise ValueError(f"init_from.{side}_layers: {bad[0]} is not a layer of the dense model "
                             f"(0..{n_dense - 1})")
    for key in ("d_model", "vocab_size", "encoder_ffn_dim", "decoder_ffn_dim"):
        if getattr(mc, key) != getattr(dc, key):
            raise ValueError(f"init_from.model: {key}={getattr(dc, key)} but the MoE config has "
                             f"{getattr(mc, key)}; expected equal shapes")
    src = dense.state_dict()
    dst = moe.state_dict()
    gen = torch.Generator().manual_seed(seed)
    counts = {"shared": 0, "layer": 0, "expert": 0}
    new: dict[str, torch.Tensor] = {}
    for k in _TOP:
        new[k] = src[k]
        counts["shared"] += 1
    for side, picks, names in (("encoder", encoder_layers, _ENC), ("decoder", decoder_layers, _DEC)):
        for i, j in enumerate(picks):
            pre_m, pre_d = f"model.{side}.layers.{i}.", f"model.{side}.layers.{j}."
            for k, v in src.items():
                if not k.startswith(pre_d):
                    continue
                rest = k[len(pre_d):]
                for a, b in names.items():
                    if rest.startswith(a):
                        new[pre_m + b + rest[len(a):]] = v
                        counts["layer"] += 1
                        break
                else:  # fc1 / fc2: the feed-forward block
                    if pre_m + "ffn." + rest in dst:  # a dense MoE-model layer
                        new[pre_m + "ffn." + rest] = v
                        counts["layer"] += 1
                        continue
                    e = 0
                    while (ek := f"{pre_m}ffn.experts.expert_{e}.{rest}") in dst:
                        noise = 1 + expert_noise * torch.randn(v.shape, generator=gen) if expert_noise else 1
                        new[ek] = v.float() * noise
                        counts["expert"] += 1
                        e += 1
                    if e == 0:
                        raise KeyError(f"no MoE parameter for dense {k}")
    if expert_drop:
        _drop_units(new, dst, expert_drop, gen)
    missing = [k for k in dst if k not in new and ".router." not in k]
    if missing:
        raise KeyError(f"upcycle left {len(missing)} MoE parameters unset, e.g. {missing[0]}")
    moe.load_state_dict({k: v.to(dst[k].dtype) for k, v in new.items()}, strict=False)
    return counts


def _drop_units(new: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], ratio: float,
                gen: torch.Generator) -> None:
    """Re-initialise ``ratio`` of each expert's hidden units in place (a different draw per expert)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"init_from.expert_drop={ratio}: expected a fraction in (0, 1]")
    for k in [k for k in new if ".experts.expert_" in k and k.endswith("fc1.weight")]:
        pre = k[: -len("fc1.weight")]
        w1, b1, w2 = new[pre + "fc1.weight"].float(), new[pre + "fc1.bias"].float(), new[pre + "fc2.weight"].float()
        hidden = w1.shape[0]
        units = torch.randperm(hidden, generator=gen)[: int(round(ratio * hidden))]

        def fresh(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            return t.mean() + t.std() * torch.randn(shape, generator=gen)

        w1, b1, w2 = w1.clone(), b1.clone(), w2.clone()
        w1[units] = fresh(w1, (len(units), w1.shape[1]))
        b1[units] = fresh(b1, (len(units),))
        w2[:, units] = fresh(w2, (w2.shape[0], len(units)))
        new[pre + "fc1.weight"], new[pre + "fc1.bias"], new[pre + "fc2.weight"] = w1, b1, w2
