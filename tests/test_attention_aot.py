"""The TPU attention kernels compile ahead of time for v5p and v6e through libtpu (Mosaic's layout rules checked)."""
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
