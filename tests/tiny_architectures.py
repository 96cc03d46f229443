"""Tiny random configurations of the architectures taught for issue 20, shared by the capture, trainer and CLI tests.

Adding an architecture: one entry in ``rhythm/capture/architectures.py: ARCHITECTURES`` and one branch here
(plus its name in NEW_KINDS); tests/test_capture_models.py then compares the capture with the model's own eager
maps on left padding, right padding and a packed row (docs/models.md: adding an architecture).
"""
from __future__ import annotations

import torch

SPAN = 12   # sliding window of every windowed tiny model: rows of 40-56 tokens see it bite
NEW_KINDS = ["olmo2", "olmo3", "qwen3_moe", "qwen3_next", "qwen3_5", "deepseek_v3", "smollm3", "phi3", "glm4_moe",
             "granite", "cohere2", "exaone4", "seed_oss", "ministral3"]
HYBRIDS = {"qwen3_next", "qwen3_5"}   # gated DeltaNet on layers 0, 2, 4; softmax attention on 1, 3, 5


def new_architecture_config(kind: str, **common):
    """(config, model class) of the issue-20 architectures; each mechanism sized to bite (SPAN-position windows,
    a scaling far from head_dim**-0.5, query scaling that grows within a row, half-width rotary)."""
    import transformers as t

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    hybrid = dict(common, num_hidden_layers=6, head_dim=8, full_attention_interval=2, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    routed = dict(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                  moe_intermediate_size=32)
    if kind == "olmo2":
        return t.Olmo2Config(**common), t.Olmo2ForCausalLM
    if kind == "olmo3":     # sliding layers 0, 1; full 2, 3
        return (t.Olmo3Config(**common, sliding_window=SPAN, layer_types=["sliding_attention"] * 2 + ["full_attention"] * 2),
                t.Olmo3ForCausalLM)
    if kind == "qwen3_moe":  # use_sliding_window: the window on every layer
        return t.Qwen3MoeConfig(**common, **moe, head_dim=8, use_sliding_window=True, sliding_window=SPAN), t.Qwen3MoeForCausalLM
    if kind == "qwen3_next":  # gated DeltaNet on 0, 2, 4; softmax attention (gated output, rotary 1/4) on 1, 3, 5
        return t.Qwen3NextConfig(**hybrid, **moe, shared_expert_intermediate_size=32), t.Qwen3NextForCausalLM
    if kind == "qwen3_5":
        return t.Qwen3_5TextConfig(**hybrid), t.Qwen3_5ForCausalLM
    if kind == "deepseek_v3":  # MLA: q/k head dim 8 + 4, v head dim 6; YaRN mscale in the scaling
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
        return (t.DeepseekV3Config(**dict(common, num_key_value_heads=4), **routed, q_lora_rank=16, kv_lora_rank=16,
                                   qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, rope_parameters=rope),
                t.DeepseekV3ForCausalLM)
    if kind == "smollm3":   # no_rope_layers [1, 0, 1, 0]: the NoPE layers 1, 3 slide
        return (t.SmolLM3Config(**common, pad_token_id=0, no_rope_layer_interval=2, use_sliding_window=True,
                                sliding_window=SPAN), t.SmolLM3ForCausalLM)
    if kind == "phi3":      # the window on every layer; rotary on half of each head
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return t.Phi3Config(**common, sliding_window=SPAN, pad_token_id=0, rope_parameters=rope), t.Phi3ForCausalLM
    if kind == "glm4_moe":  # partial_rotary_factor 0.5 (its default), q/k norms
        return t.Glm4MoeConfig(**common, **routed, head_dim=8, use_qk_norm=True), t.Glm4MoeForCausalLM
    if kind == "granite":   # scaling = attention_multiplier instead of head_dim**-0.5 = 0.35
        return t.GraniteConfig(**common, attention_multiplier=0.6), t.GraniteForCausalLM
    if kind == "cohere2":   # sliding layers 0, 2 (RoPE); full layers 1, 3 (NoPE)
        return t.Cohere2Config(**common, sliding_window=SPAN, sliding_window_pattern=2), t.Cohere2ForCausalLM
    if kind == "exaone4":   # sliding layers 0, 2 (RoPE); full layers 1, 3 (NoPE)
        return t.Exaone4Config(**common, sliding_window=SPAN, sliding_window_pattern=2), t.Exaone4ForCausalLM
    if kind == "seed_oss":
        return t.SeedOssConfig(**common, head_dim=8), t.SeedOssForCausalLM
    if kind == "ministral3":  # q scaled by 1 + beta log(1 + floor(position / 8)) before the call; window everywhere
        rope = {"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.5,
                "original_max_position_embeddings": 8}
        return t.Ministral3Config(**common, head_dim=8, sliding_window=SPAN, rope_parameters=rope), t.Ministral3ForCausalLM
    raise ValueError(kind)


def tiny_architecture(kind: str, vocab_size: int, seed: int = 0, **overrides):
    """A seeded random model of ``kind`` (hidden 32, 4 query heads over 2 KV heads, 4 layers; hybrids 6), in
    eval mode with sdpa attention. overrides: extra config fields (e.g. eos/pad token ids)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
    config, cls = new_architecture_config(kind, **common)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    return cls(config).eval()
