"""The TPU grouped-matmul kernels pass the Mosaic compiler for v5p and v6e (AOT on CPU through libtpu).

Interpret mode does not check Mosaic's block-shape rules; this does, at the Kanana-2-30B-A3B MoE shape.
"""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu's lockfile

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from pallas_kernels.moe import gmm  # noqa: E402

M, K, N, E = 49152, 2048, 768, 128


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_gmm_forward_and_backward_compile_for_tpu(topology):
    device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def loss(lhs, rhs, gs, w_down):
        h = gmm(lhs, rhs, gs, backend="tpu")
        y = gmm(h, w_down, gs, transpose_rhs=True, backend="tpu")  # [M,N] x [E,K,N]^T -> [M,K]
        return jnp.sum(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 3)))
    compiled = step.lower(spec((M, K)), spec((E, K, N)), spec((E,), jnp.int32), spec((E, K, N))).compile()
    text = compiled.as_text()
    assert text.count("moe_gmm") >= 3 and "moe_tgmm" in text, "expected the Mosaic kernels in the compiled step"


@pytest.mark.parametrize("m", [3001, 100])
def test_any_row_count_and_n_384_compile_for_tpu_with_default_tiling(m):
    """Issue 24's shapes: M no multiple of 8 or of the tile, N=384 that tn=1024 does not divide."""
    device = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    loss = lambda lhs, rhs, gs: jnp.sum(gmm(lhs, rhs, gs, backend="tpu").astype(jnp.float32) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        spec((m, 256)), spec((8, 256, 384)), spec((8,), jnp.int32)).compile()
    assert compiled.as_text().count("moe_gmm") >= 2


@pytest.mark.parametrize("m,n", [(3001, 384), (4097, 768)])
def test_any_row_count_lowers_for_hopper_with_default_tiling(m, n):
    """Mosaic GPU's TMA rules (rows a multiple of 8) are checked at lowering: M=3001 failed there before the op
    padded M; N=384 needs tn=128, which the default tiling now picks."""
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    loss = lambda lhs, rhs, gs: jnp.sum(gmm(lhs, rhs, gs, backend="gpu").astype(jnp.float32) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
        sds(m, 256), sds(8, 256, n), jax.ShapeDtypeStruct((8,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_equal_calls_share_one_lowered_kernel():
    """Two layers' gmm with equal shapes (an unscanned model, model.scan_layers=False) lower the three kernels of
    one gmm forward + backward once (gmm, dlhs gmm, tgmm behind jits keyed by shapes), not once per call site."""
    import re
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)

    def loss(x, w1, w2, gs):
        for w in (w1, w2):
            x = gmm(x, w, gs, backend="gpu")
        return jnp.sum(x.astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        sds(512, 256), sds(8, 256, 256), sds(8, 256, 256), jax.ShapeDtypeStruct((8,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", text)) == 3
