"""The TPU grouped-matmul kernel with fp8 storage operands passes the Mosaic compiler for v5p and v6e (AOT on CPU
through libtpu): fp8 operands are dequantized to bf16 in the kernel (these chips have no fp8 MXU), per-group
scales ride in SMEM by scalar prefetch. The shapes are small (tiles 512x512x256 of the default 512x1024x1024):
compile time grows with the tile, the Kanana-2-30B-A3B expert width (K=2048, N=768) takes ~20 s per chip."""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu's lockfile

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from pallas_kernels.moe.fp8 import gmm_fp8  # noqa: E402

M, K, N, E = 1024, 512, 256, 4  # narrower than the 30B-A3B experts (K=2048, N=768): compile time


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_fp8_gmm_forward_and_backward_compile_for_tpu(topology):
    device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def loss(lhs, rhs, gs):
        return jnp.sum(gmm_fp8(lhs, rhs, gs, backend="tpu").astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = step.lower(spec((M, K)), spec((E, K, N)), spec((E,), jnp.int32)).compile().as_text()
    assert text.count("moe_gmm") >= 2 and "moe_tgmm" in text, "expected the Mosaic kernels in the compiled step"
    assert "f8e4m3fn" in text and "f8e5m2" in text, "expected fp8 operands to reach the kernels"
