"""A corrected expert dispatch for transformers' NLLB-MoE (``NllbMoeExperts.forward``).

Measured here with transformers 5.23: ``NllbMoeExperts.forward`` one-hot encodes the router's
``top_1_mask``, which is already one-hot, so the "expert index" it loops over is the mask
*value* (0 or 1): module ``expert_1`` runs every token's first choice and ``expert_0`` its second
choice, whichever experts the router picked, and ``expert_2`` and up never run (no forward
calls, no gradients). Real NLLB-MoE checkpoints then compute the wrong function, and a model
trained with it has untrained experts, so expert pruning would be meaningless.

:func:`install` replaces the method with the dispatch the router intends (as in fairseq and
transformers 4.x): every expert runs on the tokens whose combine weight for it is non-zero,
scaled by that weight. cullmt-ray installs it wherever it loads or trains an NLLB-MoE model and
records ``moe_dispatch: corrected`` in every evaluation's context.
"""

from __future__ import annotations

import torch

DISPATCH_TAG = "corrected-v1"


def _experts_forward(self, hidden_states: torch.Tensor, router_mask: torch.Tensor,
                     router_probs: torch.Tensor) -> torch.Tensor:
    """``router_probs`` [tokens, experts] holds the top-1/top-2 combine weights (zero elsewhere)."""
    out = torch.zeros_like(hidden_states)
    for name, expert in self.items():
        if not name.startswith("expert_"):  # the ModuleDict also holds token_dropout
            continue
        idx = int(name.rsplit("_", 1)[1])
        tokens = torch.nonzero(router_probs[:, idx] > 0).squeeze(-1)
        if tokens.numel() == 0:
            continue
        h = expert(hidden_states[tokens]) * router_probs[tokens, idx, None]
        if self.moe_token_dropout > 0:
            h = self.token_dropout(h) if self.training else h * (1 - self.moe_token_dropout)
        out.index_add_(0, tokens, h.to(hidden_states.dtype))
    return out


def install() -> bool:
    """Patch ``NllbMoeExperts.forward`` (idempotent); False when transformers has no NLLB-MoE."""
    try:
        from transformers.models.nllb_moe import modeling_nllb_moe as m
    except ImportError:
        return False
    if getattr(m.NllbMoeExperts.forward, "__cullmt_fix__", None) != DISPATCH_TAG:
        _experts_forward.__cullmt_fix__ = DISPATCH_TAG
        m.NllbMoeExperts._stock_forward = m.NllbMoeExperts.forward
        m.NllbMoeExperts.forward = _experts_forward
    return True
