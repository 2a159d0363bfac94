"""Compile the TPU attention kernels (forward + backward) ahead of time for a TPU topology on a CPU-only machine.

    python launch/compile_kernels_aot.py --topology v5p:2x2x1 --topology v6e:2x2
libtpu (jax[tpu]==0.11.2) runs the real Mosaic compiler, so illegal block shapes, unsupported in-kernel ops and
VMEM overflows fail here, which TPU interpret mode does not check.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # parallel test workers may each load libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.attention import BlockSizes, flash_attention  # noqa: E402

# (B, T, S, H, KVH, Dqk, Dv, dtype, causal, soft-cap, segment ids)
DEFAULT_CASES = (
    (1, 1024, 1024, 4, 4, 128, 128, jnp.bfloat16, True, 50.0, False),
    (1, 640, 640, 8, 1, 192, 128, jnp.bfloat16, True, 50.0, True),
    (2, 384, 512, 4, 1, 64, 64, jnp.float32, False, None, False),
)


def compile_attention(topology: str, cases=DEFAULT_CASES, block_sizes: BlockSizes | None = None):
    """Lower and compile value_and_grad of flash_attention(backend='tpu') for one chip of `topology`.

    Returns {case: seconds}; raises the compiler's error for the first case that does not compile.
    """
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    mesh = Mesh(np.array(topo.devices).reshape(-1)[:1], ("chip",))   # the kernel runs per chip (shard_map in a model)
    replicated = NamedSharding(mesh, PartitionSpec())
    times = {}
    for case in cases:
        B, T, S, H, KVH, Dqk, Dv, dtype, causal, cap, seg = case
        sds = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)

        def loss(q, k, v, seg_ids):
            out, max_logits = flash_attention(q, k, v, causal=causal, logit_soft_cap=cap, backend="tpu",
                                              segment_ids=seg_ids if seg else None, return_max_logits=True,
                                              block_sizes=block_sizes)
            return out.astype(jnp.float32).sum() + max_logits.sum()

        t0 = time.perf_counter()
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(
                sds((B, T, H, Dqk)), sds((B, S, KVH, Dqk)), sds((B, S, KVH, Dv)), sds((B, T), jnp.int32)
            ).lower().compile()
        times[case] = time.perf_counter() - t0
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", action="append", default=None, help="e.g. v5p:2x2x1, v6e:2x2 (repeatable)")
    args = ap.parse_args()
    for topology in args.topology or ["v5p:2x2x1", "v6e:2x2"]:
        for case, secs in compile_attention(topology).items():
            print(f"{topology}: compiled fwd+bwd {case[:7]} causal={case[8]} cap={case[9]} seg={case[10]} "
                  f"in {secs:.1f}s")


if __name__ == "__main__":
    main()
