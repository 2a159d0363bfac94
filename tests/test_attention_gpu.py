"""Mosaic GPU flash attention in Mosaic GPU interpret mode on CPU: forward, max logits and gradients vs the
reference. Speed and the real wgmma/TMA path run on the H200 via benchmarks/attention.py."""
import jax.numpy as jnp
import pytest

from attention_cases import compare_with_reference
from pallas_kernels.attention import BlockSizes, flash_attention

SMALL = BlockSizes(block_kv=64, block_q_dkv=64, block_kv_dq=64)
# Pairwise cover of GQA 1/4/8, soft-cap on/off, causal on/off, segment ids, Dqk/Dv 128/128, 192/128, 64/64, T and S
# not multiples of the block; default blocks (None) and a 3-deep ring. bf16 only: wgmma has no f32 operands here.
CASES = [
    dict(B=1, T=256, S=256, H=2, KVH=2, Dqk=128, Dv=128, causal=True, cap=50.0, seg=False, block_sizes=None),
    dict(B=1, T=200, S=200, H=4, KVH=1, Dqk=64, Dv=64, causal=False, cap=None, seg=True,
         block_sizes=BlockSizes(block_kv=64, block_q_dkv=64, block_kv_dq=64, num_stages=3)),
    dict(B=1, T=130, S=130, H=8, KVH=1, Dqk=192, Dv=128, causal=True, cap=5.0, seg=True, block_sizes=SMALL),
    dict(B=2, T=100, S=300, H=2, KVH=2, Dqk=64, Dv=64, causal=True, cap=None, seg=False, block_sizes=SMALL),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "G{}_cap{}_causal{}_seg{}_d{}x{}_T{}S{}".format(
    c["H"] // c["KVH"], c["cap"], c["causal"], c["seg"], c["Dqk"], c["Dv"], c["T"], c["S"]))
def test_gpu_kernel_matches_reference(case):
    compare_with_reference("gpu", seed=sum(map(ord, str(case))) % 1000, dtype=jnp.bfloat16, **case)


def test_gpu_kernel_rejects_float32_and_odd_head_dims():
    q = jnp.ones((1, 128, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or all float16"):
        flash_attention(q, q, q, backend="gpu", interpret=True)
    q = jnp.ones((1, 128, 1, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="Dqk a multiple of 64"):
        flash_attention(q, q, q, backend="gpu", interpret=True)
