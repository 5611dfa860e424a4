"""Tiny random checkpoints of every model type reshard knows, built by transformers offline.

Each type gets the small sizes below wherever its config has the key, plus its own overrides: enough heads to
cut at tp 4, two kv heads (replicated at tp 4), a vocabulary that tp 4 must pad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
    vocab_size=250, max_position_embeddings=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
)  # fmt: skip
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(model_type: str, overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    keys = set(AutoConfig.for_model(model_type).to_dict()) | set(getattr(AutoConfig.for_model(model_type), "attribute_map", {}))
    small = {k: v for k, v in SMALL.items() if k in keys}
    return AutoConfig.for_model(model_type, **{**small, **NO_SPECIAL_TOKENS, **overrides})


def build(model_type: str, overrides: dict[str, Any], out: Path) -> Path:
    """Save a float32 model with random norms and biases, so that a mis-cut or misplaced one shows in the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, overrides)).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.5, 0.2)
    model.save_pretrained(out)
    return out
