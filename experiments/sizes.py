"""Model sizes: overrides of `kanana_jax.config.ModelConfig` per named size.

`tiny` trains in seconds on a CPU; `small` (~0.5B total) fits one GPU; `kanana2_30b_a3b` is the unverified
reconstruction of Kanana-2-30B-A3B from the public facts in docs/kanana2.md (a real checkpoint's config.json wins); `kanana2_155b_a17b`
is our reconstruction of the 155B-A17B model (no config is public): DeepSeek-V3 proportions scaled to reach
155B total / 17B active (checked by `kanana-jax params`).
"""

SIZES = {
    "tiny": dict(
        vocab_size=320, d_model=128, n_layers=3, first_k_dense=1, d_ff=384,
        n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_kv_heads=2, head_dim=32,
        n_routed_experts=8, n_shared_experts=1, moe_d_ff=128, top_k=2, n_group=2, topk_group=1,
        dtype="float32", remat_policy="none",
    ),
    "small": dict(
        vocab_size=32768, d_model=1024, n_layers=12, first_k_dense=1, d_ff=4096,
        n_heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_kv_heads=2, head_dim=128,
        n_routed_experts=32, n_shared_experts=1, moe_d_ff=384, top_k=4, n_group=1, topk_group=1,
        dtype="bfloat16", remat_policy="dots_no_batch",
    ),
    # Unverified reconstruction (docs/kanana2.md, with sources): 48 layers, first dense, 128 experts top-6, 2 shared, MLA q_lora=None.
    "kanana2_30b_a3b": dict(
        vocab_size=128256, d_model=2048, n_layers=48, first_k_dense=1, d_ff=10240,
        n_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=128, n_shared_experts=2, moe_d_ff=768, top_k=6, n_group=1, topk_group=1,
        score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0,
        rope_theta=10000.0, rope_scaling="yarn", yarn_factor=4.0, yarn_original_max_position=32768,
        yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
        dtype="bfloat16", remat_policy="full",
    ),
    # Our reconstruction (no public config): hidden 4096, 60 layers (first dense), 128 experts of width 1600,
    # top-8, 4 shared experts; chosen so that total ~ 155B and active ~ 17B (`kanana-jax params`).
    "kanana2_155b_a17b": dict(
        vocab_size=128256, d_model=4096, n_layers=60, first_k_dense=1, d_ff=16384,
        n_heads=32, q_lora_rank=1024, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=128, n_shared_experts=4, moe_d_ff=1600, top_k=8, n_group=8, topk_group=4,
        score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_theta=10000.0, rope_scaling="yarn", yarn_factor=4.0, yarn_original_max_position=32768,
        yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
        dtype="bfloat16", remat_policy="full",
    ),
}


def model_overrides(size: str) -> dict:
    """ModelConfig overrides for a named size; unknown names list the allowed ones."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; allowed sizes: {', '.join(SIZES)}")
    return dict(SIZES[size])
