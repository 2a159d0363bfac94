"""TPU (Mosaic) flash attention in TPU interpret mode on CPU: forward, max logits and gradients vs the reference."""
import jax.numpy as jnp
import pytest

from attention_cases import compare_with_reference
from pallas_kernels.attention import BlockSizes

# Pairwise cover of the matrix: GQA 1/4/8, soft-cap on/off, causal on/off, segment ids,
# Dqk/Dv 128/128, 192/128, 64/64, T and S not multiples of the block, bf16 and fp32.
CASES = [
    dict(B=1, T=256, S=256, H=2, KVH=2, Dqk=128, Dv=128, dtype=jnp.bfloat16, causal=True, cap=50.0, seg=False),
    dict(B=1, T=200, S=200, H=4, KVH=1, Dqk=64, Dv=64, dtype=jnp.float32, causal=False, cap=None, seg=True),
    dict(B=1, T=130, S=130, H=8, KVH=1, Dqk=192, Dv=128, dtype=jnp.bfloat16, causal=True, cap=5.0, seg=True),
    dict(B=2, T=100, S=300, H=2, KVH=2, Dqk=64, Dv=64, dtype=jnp.float32, causal=True, cap=None, seg=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "G{}_cap{}_causal{}_seg{}_d{}x{}_T{}S{}_{}".format(
    c["H"] // c["KVH"], c["cap"], c["causal"], c["seg"], c["Dqk"], c["Dv"], c["T"], c["S"], c["dtype"].__name__))
def test_tpu_kernel_matches_reference(case):
    compare_with_reference("tpu", seed=sum(map(ord, str(case))) % 1000, **case)


def test_tpu_kernel_multi_block_grid():
    """Several query/key blocks per row and column (skipped causal blocks, GQA head loop in dK/dV)."""
    bs = BlockSizes(block_q=128, block_kv=128, block_q_dkv=128, block_kv_dkv=256, block_q_dq=256, block_kv_dq=128)
    compare_with_reference("tpu", seed=11, B=1, T=384, S=384, H=4, KVH=2, Dqk=64, Dv=64, dtype=jnp.float32,
                           causal=True, cap=20.0, seg=True, block_sizes=bs, scale=0.2)


def test_tpu_block_sizes_must_be_lane_multiples():
    q = jnp.ones((1, 128, 1, 64), jnp.bfloat16)
    from pallas_kernels.attention import flash_attention
    with pytest.raises(ValueError, match="block_kv a multiple of 128"):
        flash_attention(q, q, q, backend="tpu", block_sizes=BlockSizes(block_kv=64), interpret=True)
