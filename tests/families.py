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


def model_types() -> list[str]:
    """Every model type a built-in family claims: each must be proven by the TP-forward test."""
    from reshard.model.rules import builtin_families

    return sorted(t for f in builtin_families().values() for t in f.model_types)


def tiny_config(model_type: str, overrides: dict[str, Any], *, sizes: dict[str, Any] = SMALL) -> Any:
    """The model type's config with `sizes` wherever it has the key, no special tokens, and `overrides`."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    keys = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    small = {k: v for k, v in sizes.items() if k in keys}
    return AutoConfig.for_model(model_type, **{**small, **NO_SPECIAL_TOKENS, **overrides})


def build(model_type: str, out: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Save a float32 model with random norms and biases, so that a mis-cut or misplaced one shows in the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    given = OVERRIDES.get(model_type, {}) if overrides is None else overrides
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, given)).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.5, 0.2)
    model.save_pretrained(out)
    return out


MLA = dict(num_key_value_heads=8, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8)
# DeepSeek's MoE: a dense first layer, one shared expert, one routing group
DEEPSEEK = dict(MLA, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1)
# DeepSeek's sparse-attention indexer
INDEXER = dict(index_n_heads=4, index_head_dim=16, index_topk=4)
LINEAR = dict(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=4, mamba_d_state=8, mamba_expand=2)
# Per model type: what its tiny checkpoint needs beyond SMALL (a MoE layer beside a dense one, small latent ranks).
OVERRIDES: dict[str, dict[str, Any]] = {
    # kv heads replicated at tp 4; vocabulary padded at tp 4 (250 = 4 x 62 + 2)
    "llama": dict(num_key_value_heads=2, vocab_size=250, head_dim=None),
    "mistral": dict(num_key_value_heads=4, vocab_size=256, head_dim=None),
    # q/k/v biases, kv heads replicated at tp 4
    "qwen2": dict(num_key_value_heads=2, vocab_size=256),
    # q_norm, k_norm
    "qwen3": dict(num_key_value_heads=4, head_dim=16, vocab_size=256),
    # tied embeddings (no lm_head in the file), one kv head replicated on every rank, padded vocabulary
    "gemma": dict(num_key_value_heads=1, head_dim=16, vocab_size=255),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, vocab_size=256),
    # fused q|k|v with kv heads replicated at tp 4, fused gate|up
    "phi3": dict(num_key_value_heads=2, vocab_size=256),
    "mixtral": dict(num_key_value_heads=4, vocab_size=256),
    "qwen2_moe": dict(num_key_value_heads=4, vocab_size=256, shared_expert_intermediate_size=64),
    "helium": dict(head_dim=8),
    # q/k norms over all heads at once: kv heads that tp 4 divides
    "olmo2": dict(num_key_value_heads=4),
    "olmo3": dict(num_key_value_heads=4),
    "olmoe": dict(num_key_value_heads=4),
    "minimax_m2": dict(num_key_value_heads=4),
    "flex_olmo": dict(num_key_value_heads=4),
    "exaone_moe": dict(first_k_dense_replace=1, num_shared_experts=1),
    "afmoe": dict(num_dense_layers=1, num_shared_experts=1),
    "hy_v3": dict(num_shared_experts=1, mlp_layer_types=["dense", "sparse"]),
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_num_shared_experts=1, moe_num_experts=4, moe_k=2),
    "kolibri1": dict(shared_expert_intermediate_size=64),
    "laguna": dict(mlp_layer_types=["dense", "sparse"]),
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1),
    "sarvam_mla": DEEPSEEK,
    "axk1": DEEPSEEK,
    "gptj": dict(rotary_dim=4),
    # one Mamba-2 layer (8 heads of 16, 4 groups) and one attention layer
    "granitemoehybrid": dict(MAMBA2, layer_types=["mamba", "attention"], shared_intermediate_size=64),
    "bamba": dict(MAMBA2, attn_layer_indices=[1]),
    "cohere_compass_text": dict(
        rope_parameters={t: dict(rope_type="default", rope_theta=10000.0) for t in ("full_attention", "sliding_attention")}
    ),
    # sliding-window layers with twice the kv heads; values wider than keys
    "mimo_v2_flash": dict(num_key_value_heads=4, v_head_dim=32, layer_types=["full_attention", "sliding_attention"]),
    # full-attention layers with their own head size (per_layer_config)
    "gemma4_unified_text": dict(global_head_dim=32),
    # an FFN width per layer; no activation sparsity (its top-k statistics span the whole FFN)
    "gemma3n_text": dict(
        num_kv_shared_layers=0,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size_per_layer_input=250,
        hidden_size_per_layer_input=16,
        intermediate_size=[128, 96],
        activation_sparsity_pattern=[0.0, 0.0],
        laurel_rank=8,
    ),
    "gemma4_text": dict(global_head_dim=32, vocab_size_per_layer_input=250, hidden_size_per_layer_input=16),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm3": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "dots3_note_text": dict(DEEPSEEK, **INDEXER, shared_experts_intermediate_size=64),
    "sarvam_moe": dict(first_k_dense_replace=1, num_shared_experts=1),
    **{
        t: dict(LINEAR, layer_types=["linear_attention", "full_attention"], shared_expert_intermediate_size=64)
        for t in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
    },
    "cwm": dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "aria_text": dict(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
    "minimax_m3_vl_text": dict(intermediate_size=32, shared_intermediate_size=64, dense_intermediate_size=128),
    "deepseek_v2": DEEPSEEK,
    "deepseek_v3": DEEPSEEK,
    "deepseek_v32": dict(DEEPSEEK, **INDEXER),
    "glm_moe_dsa": dict(DEEPSEEK, **INDEXER),
    "glm4_moe_lite": DEEPSEEK,
    "youtu": dict(MLA),
    "minicpm3": dict(MLA),
    "glm4_moe": dict(first_k_dense_replace=1, n_shared_experts=1),
    "solar_open": dict(n_shared_experts=1),
    "llama4_text": dict(intermediate_size=64, intermediate_size_mlp=128, interleave_moe_layer_step=2),
    "granitemoeshared": dict(shared_intermediate_size=64),
}

# Norms a model class builds at a size no rank-local config divides (olmoe's q_norm over hidden_size): the
# TP-forward harness runs them on the activation gathered from every rank, as engines do.
GATHERED_NORMS: dict[str, tuple[str, ...]] = {"olmoe": ("q_norm", "k_norm")}
# Blocks that end in a norm of their summed output (axk1's MoE block): the ranks' partial sums are reduced
# before that norm, as an engine runs it, instead of after the block.
REDUCED_BEFORE: dict[str, str] = {"axk1": "post_mlp_layernorm"}
# Counts the rank-local config keeps whole: gemma3n masks token ids with vocab_size_per_layer_input before its
# per-layer embedding, so the vocabulary-parallel lookup must see every id (its rows load in the rank file's shape).
WHOLE_KEYS: dict[str, tuple[str, ...]] = {"gemma3n_text": ("vocab_size_per_layer_input",)}
