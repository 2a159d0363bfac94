"""Ahead-of-time checks on CPU: TPU kernels compile for v5p and v6e through libtpu (Mosaic layout rules, VMEM), and
the Mosaic GPU kernels lower for Hopper at the benchmark shapes (layouts, wgmma shapes, shared memory)."""
import pytest

from launch.compile_kernels_aot import DEFAULT_CASES, compile_attention


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_attention_compiles_for_tpu(topology):
    times = compile_attention(topology)
    assert set(times) == set(DEFAULT_CASES)


def test_illegal_block_shape_is_rejected_by_the_tpu_compiler():
    """A key block of 64 breaks Mosaic's (8, 128) tiling for the lane-dense segment-id blocks."""
    from pallas_kernels.attention import BlockSizes
    from pallas_kernels.attention import tpu
    import jax.numpy as jnp
    ok = tpu.check_tpu_shapes
    tpu.check_tpu_shapes = lambda *a: None          # bypass our own check to reach the compiler's
    try:
        with pytest.raises(Exception, match="divisible by 8 and 128"):
            compile_attention("v6e:2x2", cases=[(1, 256, 256, 2, 2, 128, 128, jnp.bfloat16, True, None, True)],
                              block_sizes=BlockSizes(block_kv=64, block_kv_dkv=64, block_kv_dq=64))
    finally:
        tpu.check_tpu_shapes = ok


@pytest.mark.parametrize("shape", [(4, 4096, 16, 16, 128, 128), (2, 8192, 16, 4, 128, 128), (4, 4096, 32, 8, 64, 64),
                                   (4, 4096, 16, 16, 192, 128)], ids=["mha", "gqa", "d64", "mla"])
def test_gpu_kernels_lower_for_hopper(shape):
    """Mosaic GPU lowering of fwd+bwd at the benchmark shapes (layouts, wgmma shapes, <= 227 KB shared memory)."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import flash_attention
    B, T, H, KVH, Dqk, Dv = shape
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32) if Dqk == 192 else None

    def loss(q, k, v, seg_ids):
        out, max_logits = flash_attention(q, k, v, logit_soft_cap=50.0, segment_ids=seg_ids, return_max_logits=True,
                                          backend="gpu")
        return out.astype(jnp.float32).sum() + max_logits.sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        sds(B, T, H, Dqk), sds(B, T, KVH, Dqk), sds(B, T, KVH, Dv), seg).lower(lowering_platforms=("cuda",)).as_text()
    kernels = {name for name in ("flash_fwd", "flash_bwd_dkv", "flash_bwd_dq", "flash_bwd_fused") if name in text}
    # Dqk 64: forward + fused backward (dQ by TMA reduce-add); wider heads: forward + dK/dV + dQ kernels
    split = {"flash_fwd", "flash_bwd_dkv", "flash_bwd_dq"}
    assert kernels == ({"flash_fwd", "flash_bwd_fused"} if Dqk == 64 else split)
    assert ("cp.reduce" in text) == (Dqk == 64)      # the fused backward's dQ goes out by TMA reduce-add


def _lower_fwd_bwd_for_hopper(Dqk, Dv, seg, T=256):
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import flash_attention
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    seg_ids = jax.ShapeDtypeStruct((1, T), jnp.int32) if seg else None

    def loss(q, k, v, s):
        out, max_logits = flash_attention(q, k, v, logit_soft_cap=50.0, segment_ids=s, return_max_logits=True,
                                          backend="gpu")
        return out.astype(jnp.float32).sum() + max_logits.sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        sds(1, T, 2, Dqk), sds(1, T, 1, Dqk), sds(1, T, 1, Dv), seg_ids).lower(lowering_platforms=("cuda",))


def test_equal_calls_share_one_lowered_kernel():
    """Two layers' attention with equal shapes (an unscanned model) lower the forward and the two backward kernels
    once (behind jits keyed by shapes and the static config), not once per call site."""
    import re
    import jax
    import jax.numpy as jnp
    from pallas_kernels.attention import flash_attention
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)

    def loss(q, k, v, s):
        attend = lambda x: flash_attention(x, k, v, segment_ids=s, backend="gpu")
        return attend(attend(q)).astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        sds(1, 256, 2, 128), sds(1, 256, 2, 128), sds(1, 256, 2, 128), jax.ShapeDtypeStruct((1, 256), jnp.int32)
    ).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", text)) == 3   # fwd, dK/dV, dQ


@pytest.mark.parametrize("Dqk,Dv,seg", [(256, 128, True), (64, 256, True)])
def test_wide_heads_that_pass_the_shared_memory_check_lower_for_hopper(Dqk, Dv, seg):
    """Issue 24: head dims up to 256 where gpu.smem_bytes says the kernels fit: Mosaic GPU agrees."""
    _lower_fwd_bwd_for_hopper(Dqk, Dv, seg)


@pytest.mark.parametrize("Dqk,Dv", [(256, 192), (256, 256)])
def test_shared_memory_estimate_matches_the_compiler(Dqk, Dv, monkeypatch):
    """The shapes our check rejects do exceed 227 KB in Mosaic GPU, by the bytes gpu.smem_bytes counts."""
    from pallas_kernels.attention import gpu
    from pallas_kernels.attention.block_sizes import default_block_sizes
    monkeypatch.setattr(gpu, "check_gpu_shapes", lambda *a, **k: None)
    est = gpu.smem_bytes(Dqk, Dv, default_block_sizes("gpu", Dqk, Dv), False)
    first_over = next(b for b in est.values() if b > gpu.MAX_SMEM_BYTES)  # the kernels lower in this order
    with pytest.raises(Exception, match=f"smem_bytes={first_over} > max_smem_bytes={gpu.MAX_SMEM_BYTES}"):
        _lower_fwd_bwd_for_hopper(Dqk, Dv, False)


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_packed_segment_skipping_compiles_for_tpu(topology):
    """Segment ids: scalar-prefetched block bounds in SMEM and bound-clamped index maps, with dK/dV and dQ tiles of
    256 rows next to 128-row forward tiles, a padded T=300 (non-causal, soft-cap) and a causal MLA batch."""
    import jax.numpy as jnp
    from pallas_kernels.attention import BlockSizes
    cases = [(2, 300, 300, 4, 2, 128, 128, jnp.bfloat16, False, 30.0, True),
             (2, 1024, 1024, 8, 1, 192, 128, jnp.bfloat16, True, 50.0, True)]
    times = compile_attention(topology, cases=cases, block_sizes=BlockSizes(block_kv_dkv=256, block_q_dq=256))
    assert set(times) == set(cases)
